"""CPU checks of benchmarks/benchmark_attn.py's pure parts: FLOP counts, mode parsing, the
targets' verdicts, the JSON's layout, and a whole --dry-run (made-up timings, no GPU)."""
import json

import pytest
import torch

from flash_attn._bench import PASS_FLOP_FACTORS, attn_flops, attn_fwd_flops

from script_loader import load_benchmark


# issue 2's forward file had these top-level keys; a forward-only run must keep them
FWD_KEYS = {"benchmark", "dtype", "commit", "env", "build", "tokens_per_batch", "model_dim", "timing", "flops",
            "sdpa_layout", "target", "results"}


@pytest.fixture(scope="module")
def ba():
    return load_benchmark("benchmark_attn")


def shape(d=128, causal=False, s=2048):
    return {"headdim": d, "causal": causal, "seqlen": s, "batch": 16384 // s, "nheads": 2048 // d}


def refuse():
    raise RuntimeError("refused\nsecond line")


def row(ba, mode, tflops, d=128, causal=False, s=2048):
    """A result row as run_grid makes it, from {method: TFLOP/s, or None for a method that raised}."""
    r = ba.new_row(shape(d, causal, s), mode)
    for m, tf in tflops.items():
        ba.record_time(r, m, refuse if tf is None else (lambda tf=tf: r["flops"] / tf / 1e9))
    return ba.finish_row(r)


def test_flops():
    b, h, s, d = 8, 16, 2048, 128
    fwd = 4 * b * h * s * s * d
    assert attn_flops(b, h, s, s, d, False) == fwd == attn_fwd_flops(b, h, s, s, d, False)
    assert attn_flops(b, h, s, s, d, False, "bwd") == fwd * 5 // 2
    assert attn_flops(b, h, s, s, d, False, "fwdbwd") == fwd * 7 // 2
    assert attn_flops(b, h, s, s, d, True, "bwd") == fwd * 5 // 4
    assert attn_flops(b, h, s, s, d, True, "fwdbwd") == fwd * 7 // 4
    assert all(isinstance(attn_flops(b, h, s, s, d, c, m), int) for m in PASS_FLOP_FACTORS for c in (0, 1))
    with pytest.raises(ValueError):
        attn_flops(b, h, s, s, d, False, "bwd_only")


def test_pass_flops_and_anchor(ba):
    # ANCHORS.md: hd128 non-causal s=16384, SDPA flash bwd 296 TFLOP/s <-> 2.5 x 4*b*h*s^2*d / t
    sh = shape(128, False, 16384)
    assert ba.pass_flops(sh, "bwd") == 10 * 1 * 16 * 16384 ** 2 * 128
    assert ba.pass_flops(dict(sh, causal=True), "fwdbwd") == 7 * 16 * 16384 ** 2 * 128


def test_modes_and_args(ba):
    assert ba.parse_args([]).mode == ["fwd", "bwd", "fwdbwd"]
    assert ba.parse_args(["--mode", "all"]).mode == ["fwd", "bwd", "fwdbwd"]
    assert ba.parse_args(["--mode", "fwdbwd,bwd"]).mode == ["bwd", "fwdbwd"]
    q = ba.parse_args(["--quick", "--mode", "bwd"])
    assert (q.headdims, q.seqlens, q.rep_ms, q.mode) == ([128], [2048, 8192], 30, ["bwd"])
    with pytest.raises(SystemExit):
        ba.parse_args(["--mode", "backward"])
    assert ba.methods_for("fwd", deterministic=True) == ["ours", "sdpa_flash", "sdpa_cudnn"]
    assert ba.methods_for("bwd", deterministic=True) == ["ours", "ours_det", "sdpa_flash", "sdpa_cudnn"]
    assert ba.methods_for("bwd", with_ours=False) == ["sdpa_flash", "sdpa_cudnn"]


def test_rows_and_errors(ba):
    r = row(ba, "bwd", {"ours": 150.0, "sdpa_flash": 300.0, "sdpa_cudnn": None})
    assert r["results"]["ours"]["tflops"] == pytest.approx(150.0)
    assert r["ratios"]["ours/sdpa_flash"] == pytest.approx(0.5)
    assert r["ratios"]["ours/sdpa_cudnn"] is None
    assert r["results"]["sdpa_cudnn"] == {"ms": None, "tflops": None, "error": "RuntimeError: refused"}


def test_ratio_target(ba):
    rule = ba.TARGETS["bwd"][0]
    rows = [row(ba, "bwd", {"ours": 310.0, "sdpa_flash": 300.0}, s=2048),
            row(ba, "bwd", {"ours": 280.0, "sdpa_flash": 300.0}, s=4096),
            row(ba, "bwd", {"ours": 100.0, "sdpa_flash": 300.0}, s=1024),  # below 2048: not judged
            row(ba, "bwd", {"ours": None, "sdpa_flash": 300.0}, d=256, s=2048),  # unsupported: missed
            row(ba, "bwd", {"ours": 200.0, "sdpa_flash": None}, d=64, s=8192)]  # peer failed: unjudged
    t = ba.judge(rule, rows)
    assert (t["status"], t["shapes"], t["met"], t["missed"], t["unsupported"], t["unjudged"]) == \
        ("missed", 3, 1, 2, 1, 1)
    assert t["worst"]["seqlen"] == 4096 and t["worst"]["ratio"] == pytest.approx(280 / 300)
    assert {(s["headdim"], s["seqlen"]) for s in t["missed_shapes"]} == {(128, 4096), (256, 2048)}
    assert "MISSED" in ba.target_line("bwd", t) and "1 unsupported" in ba.target_line("bwd", t)
    t = ba.judge(rule, rows[:1])
    assert t["status"] == "met" and "MET" in ba.target_line("bwd", t)
    # only short sequences, or ours not timed at all: not measured, neither met nor missed
    t = ba.judge(rule, rows[2:3])
    assert t["status"] == "not measured" and "seqlen >= 2048" in ba.target_line("bwd", t)
    t = ba.judge(rule, [row(ba, "bwd", {"sdpa_flash": 300.0})])
    assert t["status"] == "not measured" and "ours was not timed" in ba.target_line("bwd", t)
    t = ba.judge(rule, rows[4:])
    assert t["status"] == "not measured" and "sdpa_flash has no time" in ba.target_line("bwd", t)


def test_tflops_and_det_targets(ba):
    rule = ba.TARGETS["bwd"][1]
    at16k = {"d": 128, "causal": False, "s": 16384}
    assert ba.judge(rule, [row(ba, "bwd", {"ours": 300.0}, **at16k)])["status"] == "met"
    t = ba.judge(rule, [row(ba, "bwd", {"ours": 148.0}, **at16k)])
    assert t["status"] == "missed" and t["fraction"] == pytest.approx(0.5)
    t = ba.judge(rule, [row(ba, "bwd", {"ours": None}, **at16k)])
    assert t["status"] == "missed" and t["value"] is None and "unsupported" in ba.target_line("bwd", t)
    assert ba.judge(rule, [row(ba, "bwd", {"ours": 300.0}, s=8192)])["status"] == "not measured"
    t = ba.judge(rule, [row(ba, "bwd", {"sdpa_flash": 300.0}, **at16k)])  # --peers-only
    assert t["status"] == "not measured" and "not timed" in ba.target_line("bwd", t)

    det = ba.TARGETS["bwd"][2]
    ok = row(ba, "bwd", {"ours": 200.0, "ours_det": 180.0})  # 11% slower: within 15%
    slow = row(ba, "bwd", {"ours": 200.0, "ours_det": 160.0}, s=4096)  # 25% slower
    assert ba.judge(det, [ok])["status"] == "met"
    t = ba.judge(det, [ok, slow])
    assert t["status"] == "missed" and t["worst_slowdown"] == pytest.approx(0.25)
    assert ba.judge(det, [row(ba, "bwd", {"ours": 200.0})])["status"] == "not measured"


def test_assemble_forward_only_keeps_issue2_layout(ba):
    rows = [row(ba, "fwd", {"ours": 330.0, "sdpa_flash": 300.0, "sdpa_cudnn": 600.0})]
    doc = ba.assemble({"dtype": "bf16", "commit": "abc", "env": {}, "build": {}, "tokens_per_batch": 16384,
                       "model_dim": 2048, "timing": "t", "flops": "f", "sdpa_layout": "l"}, {"fwd": rows})
    assert FWD_KEYS <= set(doc) and doc["benchmark"] == "attn_fwd" and doc["results"] is rows
    assert {"rule", "shapes", "met", "worst"} <= set(doc["target"]) and doc["target"]["status"] == "met"
    assert "results_bwd" not in doc and "peak_memory" not in doc
    assert ba.file_stem(doc["modes"], "NVIDIA H100 80GB HBM3", "a8686a2c8ac1") == \
        "attn_fwd_nvidia-h100-80gb-hbm3_a8686a2c8ac1"
    json.dumps(doc)


def test_dry_run_all_modes(ba, tmp_path, capsys):
    assert ba.main(["--dry-run", "--quick", "--no-plot", "--deterministic", "--out-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("attn_fwd-bwd-fwdbwd_dry-run_*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["modes"] == ["fwd", "bwd", "fwdbwd"] and doc["dry_run"]
    assert FWD_KEYS <= set(doc)
    for key in ("results", "results_bwd", "results_fwdbwd"):
        assert len(doc[key]) == 4  # hd128 x causal off/on x seqlens 2048, 8192
    assert doc["results_bwd"][0]["flops"] == 2.5 * doc["results"][0]["flops"]
    assert doc["results_fwdbwd"][0]["flops"] == 3.5 * doc["results"][0]["flops"]
    assert {"ours", "ours_det", "sdpa_flash", "sdpa_cudnn"} == set(doc["results_bwd"][0]["results"])
    assert len(doc["peak_memory"]) == 4 and doc["peak_memory"][0]["results"]["ours"]["peak_gb"] > 0
    assert [t["status"] for t in doc["targets"]["bwd"]] == ["missed", "not measured", "met"]
    out = capsys.readouterr().out
    summary = out[out.index("=== summary"):]
    assert "targets:" in summary and "[backward] ours >= 1.0x sdpa_flash" in summary
    assert "(that shape is not in this run's grid)" in summary  # --quick has no s=16384


def test_dry_run_unsupported_head_dim(ba, tmp_path, capsys):
    # our backward refuses hd 512 (above 256) in the fake as it does on the GPU: a null with the reason
    argv = ["--dry-run", "--no-plot", "--mode", "bwd", "--headdims", "512", "--seqlens", "512,2048",
            "--causal", "on", "--out-dir", str(tmp_path)]
    assert ba.main(argv) == 0
    doc = json.loads(next(tmp_path.glob("attn_bwd_dry-run_*.json")).read_text())
    assert "results" not in doc and "target" not in doc
    ours = [r["results"]["ours"] for r in doc["results_bwd"]]
    assert all(o["tflops"] is None and "head dims <= 256" in o["error"] for o in ours)
    cudnn = doc["results_bwd"][0]["results"]["sdpa_cudnn"]  # the fake's refusing peer (s=512)
    assert cudnn["tflops"] is None and cudnn["error"]
    assert doc["targets"]["bwd"][0]["status"] == "missed"
    assert "ours failed on 2 shape(s)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_no_gpu_message(ba, capsys):
    assert ba.main(["--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["bwd", "fwdbwd"])
def test_grad_timing_helpers_on_cpu(mode, monkeypatch):
    """The timed callables of flash_attn._bench, run on the CPU path with a stand-in timer:
    'bwd' runs the forward once and the backward on every call (retain_graph), 'fwdbwd' both."""
    import flash_attn
    from flash_attn import _bench
    from torch.nn.attention import SDPBackend

    calls = {"fwd": 0, "timed": 0}
    real = flash_attn.flash_attn_func

    def counting(*args, **kwargs):
        calls["fwd"] += 1
        return real(*args, **kwargs)

    def fake_time_ms(fn, **timing):
        for _ in range(3):
            dq, dk, dv = fn()
            assert dq.shape == dk.shape == dv.shape and torch.isfinite(dq).all()
            calls["timed"] += 1
        return 1.0

    monkeypatch.setattr(flash_attn, "flash_attn_func", counting)
    monkeypatch.setattr(_bench, "time_ms", fake_time_ms)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 16, 4, 32, generator=g) for _ in range(4))
    assert _bench.time_ours_grad_ms(q, k, v, dout, True, mode, rep_ms=1) == 1.0
    # one untimed call before timing (it raises there when a shape is unsupported), then 3 timed
    assert calls == {"fwd": 1 if mode == "bwd" else 4, "timed": 3}
    assert not q.requires_grad  # the helper differentiates its own leaves, not the caller's tensors
    qt, kt, vt = _bench.sdpa_inputs(q, k, v)
    assert _bench.time_sdpa_grad_ms(qt, kt, vt, dout.transpose(1, 2).contiguous(), True, SDPBackend.MATH,
                                    mode, rep_ms=1) == 1.0
    with pytest.raises(ValueError):
        _bench.time_ours_grad_ms(q, k, v, dout, True, "fwd")
