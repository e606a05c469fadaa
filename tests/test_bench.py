"""`python -m cvg.bench` runs end to end at a toy size and records what it claims (no speed is checked here)."""

import json

from cvg.bench import VARIANTS, _dtype_variants, _parser, _rows, main


def test_bench_records_every_variant_and_phase(tmp_path, capsys):
    results, table = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    size = "--height 32 --width 32 --frames 5 --steps 3 --guide-steps 1 --layers 2 --heads 2 --repeats 1"
    # No compile (seconds, not minutes); 2 layers: FirstBlockCache needs a block after the first. The precision
    # rows in float32: what is recorded is the same, and bfloat16 is emulated (~100x slower) on CPUs without
    # bf16 units, which CI may have.
    argv = [*size.split(), "--backends", "torch", "--dtypes", "float32", "--fast-engine", "torch"]
    main([*argv, "--json", str(results), "--write", str(table)])
    record = json.loads(results.read_text())
    precisions = _dtype_variants(_parser().parse_args(argv))
    assert len(precisions) == 8 and "guided@float32+batch-cfg+torch" in precisions
    assert set(record["times"]) == {*VARIANTS, "guided+torch", *precisions}
    assert set(record["peak_bytes"]) == set(VARIANTS)
    # Denoising always maps new memory (the text encoder's activations); a toy decode may fit in what is
    # mapped already, so 0 is a true answer for it (it failed CI once as -0.0 MiB: pages reclaimed).
    assert all(m["denoise"] > 0 and m["decode"] >= 0 for m in record["peak_bytes"].values())
    guided = record["times"]["guided"][0]
    assert guided["guided_steps"] > 0 and guided["unguided_steps"] > 0 and guided["first_call"] > 0
    text = table.read_text()
    for variant in (*VARIANTS, "guided+torch"):
        assert f"| {variant} |" in text
    assert "| guided | float32 | torch | yes | - |" in text
    assert "| unguided | float32 | eager | yes | FirstBlockCache 0.1 |" in text
    assert "<!-- cvg_bench -->" in text and "<!-- cvg_bench_engines -->" in text
    assert "<!-- cvg_bench_precision -->" in text
    printed = capsys.readouterr()
    assert "naive-guided" in printed.out
    for variant in (*VARIANTS, "guided+torch", *precisions):  # each row printed as it was measured
        assert f"{variant}: " in printed.out


def test_the_default_rows_are_the_light_ones():
    """Step backends and other precisions are flags: the default measures the five main variants only."""
    args = _parser().parse_args([])
    assert (args.backends, args.dtypes) == ([], [])
    assert _rows(args) == list(VARIANTS)
