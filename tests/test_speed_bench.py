from __future__ import annotations

from brickwork.benchmarks.speed import SpeedBenchConfig, render_table, run_speed_bench, write


def test_speed_bench_quick_run_measures_every_shape(monkeypatch, tmp_path, text_file):
    config = SpeedBenchConfig(quick=True, fractions=(0.5,), repeats=1)
    config.calib = str(text_file)
    results = run_speed_bench(config, progress=False)
    names = [r["name"] for r in results["rows"]]
    assert names == ["experts 50%", "neurons 50%"]
    for row in results["rows"]:
        assert set(row["ffn"]) == {"decode b1", "decode b4", "prefill 32"}
        assert set(row["e2e"]) == {"decode b1", "decode b4", "prefill 32"}
        for entry in [*row["ffn"].values(), *row["e2e"].values()]:
            assert entry["dense_s"] > 0 and entry["carved_s"] > 0
            assert abs(entry["speedup"] - entry["dense_s"] / entry["carved_s"]) < 1e-12
        for entry in row["switch"].values():
            kernel_paths = {k: v for k, v in entry["seconds"].items() if k not in ("auto", "dense")}
            assert entry["fastest"] == min(kernel_paths, key=kernel_paths.get)
            assert entry["auto_speedup"] == entry["seconds"]["dense"] / entry["seconds"]["auto"]
    assert "grouped" in results["rows"][0]["switch"][16]["seconds"]  # expert-level carves can group tokens
    assert "grouped" not in results["rows"][1]["switch"][16]["seconds"]  # neuron level: no grouped path
    assert 0 < results["ffn_share_of_dense_decode"] < 1
    assert "FFN share of dense batch-1 decode time" in render_table(results)
    write(results, tmp_path / "speed")
    assert {p.name for p in (tmp_path / "speed").iterdir()} == {"results.json", "results.md", "speed.png"}
