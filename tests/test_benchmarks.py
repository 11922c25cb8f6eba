"""The benchmarks run (`--smoke`: tiny preset, a couple of steps) and write the JSON they promise."""

import json

import pytest

from benchmarks import bn_baseline, common, peak, pipeline, throughput


def _run(module, tmp_path, *extra):
    payload = module.main(["--smoke", "--quiet", "--out-dir", str(tmp_path), *extra])
    name = payload["benchmark"]
    with open(tmp_path / f"{name}_smoke.json") as f:
        saved = json.load(f)
    for key in ("benchmark", "settings", "machine", "wall_seconds", "load_average_at_end"):
        assert key in saved, key
    for key in ("cpu", "usable_cpus", "tensorflow", "keras", "load_average_1_5_15", "other_busy_processes"):
        assert key in saved["machine"], key
    return saved


def _positive_summary(summary):
    assert summary["n"] >= 1 and 0 < summary["min"] <= summary["median"] <= summary["max"]


def test_interleave_alternates_order_and_warms_up():
    calls = []
    measures = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "ab"}
    values = common.interleave(measures, repeats=3, warmup_rounds=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert values == {"a": [3, 6, 7], "b": [4, 5, 8]}
    assert common.paired_ratios([2, 6], [1, 2])["median"] == 2.5


def test_bn_twin_has_the_nf_convolutions():
    for preset in ("tiny", "tiny_grouped"):
        shapes = {v: sorted(bn_baseline.conv_kernel_shapes(bn_baseline.build_variant(v, preset)))
                  for v in bn_baseline.VARIANTS}
        assert shapes["bn"] == shapes["nf"] == shapes["nf_plain_conv"]
    bn = bn_baseline.build_bn_model("tiny")
    assert not any(type(layer).__name__ in ("NFBlock", "WSConv2D", "ScaledActivation") for layer in bn.layers)
    assert sum(type(layer).__name__ == "BatchNormalization" for layer in bn.layers) == 2 * 4 + 1
    with pytest.raises(ValueError, match="Unknown variant"):
        bn_baseline.build_variant("ln", "tiny")


def test_bn_baseline_smoke(tmp_path):
    saved = _run(bn_baseline, tmp_path)
    assert saved["all_convs_match"] is True
    assert {row["variant"] for row in saved["variants"]} == set(bn_baseline.VARIANTS)
    assert len({row["macs"] for row in saved["variants"]}) == 1


def test_throughput_smoke(tmp_path):
    saved = _run(throughput, tmp_path)
    assert saved["target"] == {"nf_over_bn": 1.5}
    [result] = saved["results"]
    assert result["batch_size"] == 8 and result["xla"] is False
    for variant in ("nf", "bn"):
        _positive_summary(result["images_per_s"][variant])
        assert result["first_step_s"][variant] > 0
    _positive_summary(result["ratio"])
    _positive_summary(result["ratio_per_cpu_s"])
    assert isinstance(result["target_met"], bool)


def test_peak_smoke(tmp_path):
    saved = _run(peak, tmp_path)
    [baseline] = saved["results"]
    assert baseline["action"] == "baseline"
    _positive_summary(baseline["matmul_gflops"]["float32"])
    assert [row["name"] for row in baseline["rows"]] == ["nf@8", "nf_plain_conv@8", "nf_no_bias@8", "bn@8"]
    for row in baseline["rows"]:
        _positive_summary(row["images_per_s"])
        _positive_summary(row["fraction_of_peak"])
        _positive_summary(row["fraction_of_peak_per_cpu_s"])
        assert row["training_flops_per_image"] > 0
    assert [profile["row"] for profile in baseline["profiles"]] == ["nf@8", "bn@8"]
    for profile in baseline["profiles"]:
        assert profile["ops_per_step"] > 0 and profile["top_op_types"]
        assert any("Conv2D" in op["op_type"] for op in profile["top_op_types"])
        assert abs(sum(part["share"] for part in profile["by_part"]) - 1) < 0.01
    assert saved["reference"]["row"] == "nf@8"


def test_pipeline_smoke(tmp_path):
    saved = _run(pipeline, tmp_path)
    [alone] = saved["pipeline_alone"]
    assert set(alone["pipelines"]) == {"seed", "standard"}
    for result in alone["pipelines"].values():
        _positive_summary(result["images_per_s"])
    [fed] = saved["training"]
    for mode in ("pipeline", "memory"):
        _positive_summary(fed["images_per_s"][mode])
    _positive_summary(fed["ratio"])
    assert 0 < fed["pipeline_cores_needed"]
    _positive_summary(fed["ratio_per_cpu_s"])
    assert saved["target"] == {"pipeline_over_memory": 0.95}
