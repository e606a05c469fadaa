"""cvg-research: the measurement bed behind cvg's claims, apart from the library a serving user installs.

    cvg_research.compshapes   the CompShapes world: grammar, sealed splits, renders, the judge, datasets
    cvg_research.training     the CompShapes generator, the classifier's readings and dual inversion
    cvg_research.experiments  the findings, diagnostics and the generator's measurement
    cvg_research.cli          its `cvg` commands (compshapes-dataset, sample, eval, train-*), registered with
                              cvg's command line through the `cvg.commands` entry point

It imports cvg; cvg never imports it (import-linter checks both in CI).
"""
