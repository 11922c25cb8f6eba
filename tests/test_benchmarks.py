"""The benchmarks run end to end (`--smoke`: tiny preset, a couple of steps) and report consistent figures.

Each smoke run's JSON is checked against itself: every ratio is the quotient of
the two rates it names, round by round; every rate per wall second is the rate
per CPU-second times the cores used; the timed windows fit in the run's wall
time; each `target_met` agrees with its figure and target; the printed table
shows the JSON's numbers.
"""

import argparse
import importlib.util
import json
import os
import pickle

import keras
import numpy as np
import pytest

import nfnet_keras
from benchmarks import backends, bn_baseline, common, peak, pipeline, throughput

from conftest import write_synthetic_cifar


def _run(module, tmp_path, *extra):
    payload = module.main(["--smoke", "--quiet", "--out-dir", str(tmp_path), *extra])
    name = payload["benchmark"]
    with open(tmp_path / f"{name}_smoke.json") as f:
        saved = json.load(f)
    assert payload["json_path"] == str(tmp_path / f"{name}_smoke.json")
    for key in ("benchmark", "settings", "machine", "wall_seconds", "load_average_at_end"):
        assert key in saved, key
    for key in ("cpu", "usable_cpus", "tensorflow", "keras", "load_average_1_5_15", "other_busy_processes"):
        assert key in saved["machine"], key
    assert saved["settings"]["smoke"] is True and saved["wall_seconds"] > 0
    return saved


def _check_summary(summary, n):
    """A `common.summarize` of n positive values: ordered, and the values it summarises."""
    values = summary["values"]
    assert summary["n"] == len(values) == n
    assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    assert summary["min"] == min(values) and summary["max"] == max(values)
    assert min(values) <= summary["mean"] <= max(values)


def _quotients(numerators, denominators):
    return [a / b for a, b in zip(numerators["values"], denominators["values"])]


def _check_rate_is_cpu_rate_times_cores(per_wall_s, per_cpu_s, cores):
    # images / wall s = (images / CPU s) x (CPU s / wall s), up to the rounding
    # of the JSON: rates to 0.1 (or 0.01), cores to 0.01.
    for rate, cpu_rate, used in zip(per_wall_s["values"], per_cpu_s["values"], cores["values"]):
        assert abs(rate - cpu_rate * used) <= 0.005 * cpu_rate + 0.05 * used + 0.05 + 1e-6, (rate, cpu_rate, used)


def _table(out, first_header):
    """The Markdown table of `out` whose header starts with `first_header`: a list of row dicts."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
    headers = split(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, split(line))))
    return rows


# === Helpers ===


def test_interleave_alternates_order_and_warms_up():
    calls = []
    measures = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "ab"}
    values = common.interleave(measures, repeats=3, warmup_rounds=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert values == {"a": [3, 6, 7], "b": [4, 5, 8]}
    assert common.paired_ratios([2, 6], [1, 2])["median"] == 2.5


def test_summarize_and_rates():
    summary = common.summarize([3.0, 1.0, 2.0, 10.0], digits=1)
    assert summary == {"n": 4, "min": 1.0, "median": 2.5, "max": 10.0, "mean": 4.0,
                       "values": [3.0, 1.0, 2.0, 10.0]}
    assert common.summarize([]) == {"n": 0}
    samples = [{"rate": 10.0, "cpu_rate": 5.0, "cores": 2.0}, {"rate": 4.0, "cpu_rate": 4.0, "cores": 1.0}]
    assert common.rates(samples) == [10.0, 4.0]
    assert common.rates(samples, "cpu_rate", scale=0.5) == [2.5, 2.0]


def test_bn_twin_has_the_nf_convolutions():
    from nfnet_keras import ScaledActivation, WSConv2D

    for preset in ("tiny", "tiny_grouped"):
        shapes = {v: sorted(bn_baseline.conv_kernel_shapes(bn_baseline.build_variant(v, preset)))
                  for v in bn_baseline.VARIANTS}
        assert shapes["bn"] == shapes["nf"] == shapes["nf_plain_conv"] == shapes["nf_no_bias"]
    bn = bn_baseline.build_bn_model("tiny")
    layers = list(bn._flatten_layers(include_self=False))
    assert not any(isinstance(layer, (WSConv2D, ScaledActivation)) for layer in layers)
    # A BatchNorm before each of the 4 activations of the 2 blocks, and one before the head.
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in layers) == 2 * 4 + 1
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and not any(conv.use_bias for conv in convs)
    assert not any("skip_gain" in v.path for v in bn.weights)
    with pytest.raises(ValueError, match="Unknown variant"):
        bn_baseline.build_variant("ln", "tiny")


# === The synthetic CIFAR-10 the data benchmarks read ===


def test_synthetic_cifar_dir_reads_as_cifar10_with_learnable_classes(synthetic_cifar_dir):
    from nfnet_keras.contract import CLASS_NAMES
    from nfnet_keras.data import load_cifar10, preprocess

    folder = os.path.join(synthetic_cifar_dir, "cifar-10-batches-py")
    assert sorted(os.listdir(folder)) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    with open(os.path.join(folder, "data_batch_3"), "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (200, 3072)
    assert len(batch[b"labels"]) == 200 and all(type(label) is int for label in batch[b"labels"])
    with open(os.path.join(folder, "batches.meta"), "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert tuple(name.decode() for name in meta[b"label_names"]) == CLASS_NAMES
    assert meta[b"num_vis"] == 3072

    (x, y), (x_test, y_test) = load_cifar10(synthetic_cifar_dir)
    assert x.shape == (1000, 32, 32, 3) and x.dtype == np.uint8 and x_test.shape == (200, 32, 32, 3)
    assert np.bincount(y, minlength=10).tolist() == [100] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [20] * 10
    # Rows are channels-first: the red plane of an image is its first 1024 values.
    np.testing.assert_array_equal(x[400:600, :, :, 0].reshape(200, 1024), batch[b"data"][:, :1024])
    # A linear model of the mean colour learns the classes in 20 full-batch steps (100% measured).
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(preprocess(x), y, batch_size=1000, epochs=20, verbose=0)
    _, accuracy = model.evaluate(preprocess(x_test), y_test, verbose=0)
    assert accuracy >= 0.9


# === The benchmarks, end to end ===


def test_bn_baseline_smoke(tmp_path, capsys):
    saved = _run(bn_baseline, tmp_path)
    rows = {row["variant"]: row for row in saved["variants"]}
    assert set(rows) == set(bn_baseline.VARIANTS)
    assert saved["all_convs_match"] is True
    assert all(row["same_convs_as_nf"] for row in rows.values())
    # The BN twin's MACs are counted layer by layer, the NF model's by count_macs: they agree.
    assert len({row["macs"] for row in rows.values()}) == 1
    assert len({row["convs"] for row in rows.values()}) == 1
    assert rows["nf"]["params"] == nfnet_keras.build_model("tiny").count_params()
    # The NF twins differ from the NF model only by gains and biases: fewer parameters.
    assert rows["nf_plain_conv"]["params"] < rows["nf"]["params"]
    assert rows["nf_no_bias"]["params"] < rows["nf"]["params"]
    printed = {row["variant"]: row for row in _table(capsys.readouterr().out, "variant")}
    assert {v: int(row["parameters"]) for v, row in printed.items()} == {v: r["params"] for v, r in rows.items()}


@pytest.mark.slow
def test_throughput_smoke(tmp_path, capsys):
    saved = _run(throughput, tmp_path)
    settings = saved["settings"]
    repeats, steps = settings["repeats"], settings["steps"]
    [result] = saved["results"]
    assert result["batch_size"] == settings["batch_sizes"][0] and result["xla"] is False
    for variant in ("nf", "bn"):
        for key in ("images_per_s", "images_per_cpu_s", "cores_used"):
            _check_summary(result[key][variant], repeats)
        _check_rate_is_cpu_rate_times_cores(
            result["images_per_s"][variant], result["images_per_cpu_s"][variant], result["cores_used"][variant]
        )
        assert result["first_step_s"][variant] > 0
    # NF/BN per round, from the two rates of that round (images/s rounded to 0.01).
    ips = result["images_per_s"]
    assert result["ratio"]["values"] == pytest.approx(_quotients(ips["nf"], ips["bn"]), rel=1e-3)
    cpu = result["images_per_cpu_s"]
    assert result["ratio_per_cpu_s"]["values"] == pytest.approx(_quotients(cpu["nf"], cpu["bn"]), rel=1e-3)
    # The timed windows (steps x batch images each) took less than the whole run.
    timed = sum(steps * result["batch_size"] / v for variant in ("nf", "bn") for v in ips[variant]["values"])
    assert timed < saved["wall_seconds"]
    assert result["target_met"] == (result["ratio"]["median"] >= saved["target"]["nf_over_bn"])
    assert saved["target_met_everywhere"] == result["target_met"]
    [row] = _table(capsys.readouterr().out, "XLA")
    assert float(row["NF median"]) == pytest.approx(ips["nf"]["median"], rel=0.01, abs=0.01)
    assert float(row["BN median"]) == pytest.approx(ips["bn"]["median"], rel=0.01, abs=0.01)
    assert float(row["NF/BN median"]) == pytest.approx(result["ratio"]["median"], abs=0.01)


@pytest.mark.slow
def test_backends_smoke(tmp_path, capsys):
    expected = ["tensorflow"] + [b for b in ("jax", "torch") if importlib.util.find_spec(b)]
    saved = _run(backends, tmp_path, "--backends", ",".join(["tensorflow", "jax", "torch"]))
    settings = saved["settings"]
    repeats, steps = settings["repeats"], settings["steps"]
    assert [r["backend"] for r in saved["results"]] == expected
    assert [s["backend"] for s in saved["skipped"]] == [b for b in ("jax", "torch") if b not in expected]
    for result in saved["results"]:
        assert result["xla"] is (result["backend"] == "jax")  # each backend as fit runs it on a CPU
        _check_summary(result["step_ms"], repeats)
        _check_summary(result["images_per_s"], repeats)
        _check_rate_is_cpu_rate_times_cores(result["images_per_s"], result["images_per_cpu_s"],
                                            result["cores_used"])
        # images/s and ms/step are two views of the same windows.
        for ms, rate in zip(result["step_ms"]["values"], result["images_per_s"]["values"]):
            assert rate == pytest.approx(1000 * result["batch_size"] / ms, rel=0.02)
        assert np.isfinite([result["loss_first_step"], result["loss_last_step"]]).all()
    timed = sum(steps * v / 1000 for r in saved["results"] for v in r["step_ms"]["values"])
    assert timed < saved["wall_seconds"]
    printed = {row["backend"]: row for row in _table(capsys.readouterr().out, "backend")}
    assert set(printed) == set(expected)
    for result in saved["results"]:
        assert float(printed[result["backend"]]["ms/step median"]) == pytest.approx(result["step_ms"]["median"],
                                                                                    rel=0.01, abs=0.1)


@pytest.mark.slow
def test_peak_smoke(tmp_path):
    saved = _run(peak, tmp_path)
    repeats = saved["settings"]["repeats"]
    [baseline] = saved["results"]
    assert baseline["action"] == "baseline"
    matmul = baseline["matmul_gflops"]["float32"]
    _check_summary(matmul, repeats)
    assert saved["machine_peak_gflops_float32"] == matmul["max"]
    assert [row["name"] for row in baseline["rows"]] == ["nf@8", "nf_plain_conv@8", "nf_no_bias@8", "bn@8"]
    # The twins have the NF model's convolutions, hence its nominal FLOPs.
    flops = {row["training_flops_per_image"] for row in baseline["rows"]}
    assert len(flops) == 1 and flops.pop() > 0
    for row in baseline["rows"]:
        for key in ("images_per_s", "achieved_gflops", "fraction_of_peak", "fraction_of_peak_per_cpu_s"):
            _check_summary(row[key], repeats)
        flops = row["training_flops_per_image"]
        ips = row["images_per_s"]["values"]
        # achieved FLOP/s = images/s x FLOPs/image; fraction = that / the same round's matmul FLOP/s.
        assert row["achieved_gflops"]["values"] == pytest.approx([v * flops * 1e-9 for v in ips], rel=0.01, abs=0.1)
        expected = [v * flops / (m * 1e9) for v, m in zip(ips, matmul["values"])]
        assert row["fraction_of_peak"]["values"] == pytest.approx(expected, rel=0.01, abs=1e-4)
    assert [profile["row"] for profile in baseline["profiles"]] == ["nf@8", "bn@8"]
    for profile in baseline["profiles"]:
        assert profile["ops_per_step"] > 0 and profile["top_op_types"]
        assert any("Conv2D" in op["op_type"] for op in profile["top_op_types"])
        assert abs(sum(part["share"] for part in profile["by_part"]) - 1) < 0.01
        assert sum(op["share"] for op in profile["top_op_types"]) <= 1.0 + 1e-3
    reference = saved["reference"]
    assert reference["row"] == "nf@8"
    assert reference["fraction_of_peak"] == baseline["rows"][0]["fraction_of_peak"]
    assert reference["target_met"] == (
        reference["fraction_of_peak_per_cpu_s"]["median"] >= saved["target"]["fraction_of_peak"]
    )


@pytest.mark.slow
def test_pipeline_smoke_on_cifar_batches(tmp_path):
    # The real reader: 5 x 1100 images in the cifar-10-batches-py layout, split
    # into 5000 validation and 500 training images.
    data_dir = write_synthetic_cifar(tmp_path / "data", per_batch=1100, test=10)
    saved = _run(pipeline, tmp_path, "--data-dir", data_dir, "--synthetic", "0")
    repeats = saved["settings"]["repeats"]
    assert saved["data"] == "CIFAR-10 training split (500 images)"
    [alone] = saved["pipeline_alone"]
    assert set(alone["pipelines"]) == set(saved["settings"]["augments"])
    for result in alone["pipelines"].values():
        _check_summary(result["images_per_s"], repeats)
        _check_rate_is_cpu_rate_times_cores(result["images_per_s"], result["images_per_cpu_s"], result["cores_used"])
    [fed] = saved["training"]
    for mode in ("pipeline", "memory"):
        _check_summary(fed["images_per_s"][mode], repeats)
        _check_rate_is_cpu_rate_times_cores(
            fed["images_per_s"][mode], fed["images_per_cpu_s"][mode], fed["cores_used"][mode]
        )
    ips = fed["images_per_s"]
    assert fed["ratio"]["values"] == pytest.approx(_quotients(ips["pipeline"], ips["memory"]), rel=1e-3)
    # Cores the pipeline needs = training images/s x the pipeline's CPU-seconds per image.
    train_augment = saved["settings"]["train_augment"]
    assert fed["augment"] == train_augment
    needed = ips["memory"]["median"] / alone["pipelines"][train_augment]["images_per_cpu_s"]["median"]
    assert fed["pipeline_cores_needed"] == pytest.approx(needed, rel=0.01, abs=1e-4)
    assert fed["target_met"] == (fed["ratio"]["median"] >= saved["target"]["pipeline_over_memory"])
    assert saved["target_met"] == fed["target_met"]


def test_every_speed_screen_row_and_variant_is_a_valid_fit_command():
    from benchmarks import speed_ablation, speed_start
    from nfnet_keras import fit

    # A flag that fit refuses exits 2 here, before hours of a screen are spent on it.
    args = speed_ablation.argparse.Namespace(epochs=5, seed=0, extra=[])
    rows = {name: speed_ablation.fit_command(args, flags)[3:] for name, flags in speed_ablation.ROWS.items()}
    variants = {name: ["--recipe", "speed", *speed_start.BASE, *flags]
                for name, flags in speed_start.VARIANTS.items()}
    configs = {name: fit.parse_config(argv)[0] for name, argv in {**rows, **variants}.items()}
    b7 = configs["b7_muon_kpeak0.5"]
    assert (b7.optimizer, b7.kernel_lr, b7.kernel_peak_pct, b7.augment) == ("muon", 0.24, 0.5, "translate_altflip")
    # the rows and variants train at the batch and lrs they were measured at, not the recipe's batch 128
    assert all((c.batch_size, c.lr) == (512, 0.4) for name, c in configs.items() if "batch" not in name), configs
    assert (configs["b29_muon_batch128"].batch_size, configs["b25_muon_batch256"].batch_size) == (128, 256)
    # ... and on the network they were measured on, not the recipe's wider one
    assert all(c.preset == "cifar_speed" for c in configs.values()), configs
    assert configs["muon_kpeak0.5"].kernel_peak_pct == 0.5 and configs["muon"].kernel_peak_pct is None


def test_speed_ablation_rows_and_summary(tmp_path):
    from benchmarks import speed_ablation

    flags = speed_ablation.row_flags()
    assert flags["a0_recipe"] == [] and flags["b4_renorm"][:2] == ["--augment", "translate_altflip"]
    assert "--conv-init" not in flags["b3_lookahead"]  # dirac lost, so the rows after it leave it out
    run = tmp_path / "ab_a1_altflip"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(dict(
        test_accuracy=0.8757, test_accuracy_flip_tta=0.8815, test_accuracy_tta=0.8831,
        history=dict(val_accuracy=[0.67, 0.8]), seconds_per_epoch=[100.0, 110.5])))
    (tmp_path / "ab_a1_altflip.eval_weighted.txt").write_text("test accuracy: 0.8823 (8823/10000, ...)\n")
    args = speed_ablation.argparse.Namespace(runs_dir=str(tmp_path), epochs=5, seed=0, extra=[])
    (row,) = speed_ablation.summarize(args, {"a1_altflip": flags["a1_altflip"], "a2_dirac": flags["a2_dirac"]})
    assert (row["row"], row["test_accuracy_6view_tta"], row["test_accuracy_weighted_tta"]) == ("a1_altflip", 0.8831,
                                                                                               0.8823)
    assert row["seconds"] == 210.5 and row["command"].endswith(
        "--no-export --preset cifar_speed --optimizer sgd --augment translate_flip --batch-size 512 --lr 0.4 "
        "--kernel-lr 0.24 --augment translate_altflip")


# === The trainer's overhead and the PyTorch airbench94 comparison ===


def _window(first_step, validation, epoch_end, fit_end, seconds, callbacks=None, with_validation=True):
    """A window of `benchmarks.overhead` as its clocks record it, with fit starting at t=10."""
    marks = dict(fit_start=10.0, first_step=first_step, epoch_end=epoch_end, fit_end=fit_end)
    if with_validation:
        marks.update(validation_start=validation[0], validation_end=validation[1])
    return dict(marks=marks, seconds=seconds, callbacks=callbacks or {})


def test_overhead_phases_and_recipe_epoch_projection():
    from benchmarks import overhead

    trainer = _window(11.0, (31.0, 32.0), 35.0, 35.5, 27.0, {
        "SignalPropagationLogger.on_epoch_begin": 0.6, "SignalPropagationLogger.on_epoch_end": 1.4})
    assert overhead.phase_seconds(trainer) == pytest.approx(dict(
        before_fit=1.5, fit_until_first_step=1.0, training_steps=20.0, validation=1.0, epoch_end=3.0,
        after_epoch=0.5))
    bare = _window(10.5, None, 26.5, 26.6, 16.7, with_validation=False)
    assert overhead.phase_seconds(bare) == pytest.approx(dict(
        before_fit=0.1, fit_until_first_step=0.5, training_steps=16.0, validation=0.0, epoch_end=0.0,
        after_epoch=0.1))
    assert overhead.epoch_seconds(trainer) == 24.0 and overhead.epoch_seconds(bare) == 16.0
    args = argparse.Namespace(steps=20, batch_size=512)
    p = overhead.project_recipe_epoch(args, [trainer], [bare])
    assert p["steps"] == 96  # ceil(49,000 / 512); at batch 128, 383
    at_128 = overhead.project_recipe_epoch(argparse.Namespace(steps=20, batch_size=128), [trainer], [bare])
    assert at_128["steps"] == 383
    # 20 s / 20 steps; per epoch: validation 1 + epoch end 3 - the plot 1.4 + 0.5 plots an epoch x 1 s a plot
    # (5 plots in 10 epochs); per run: 1.5 + 1 + 0.5 - the plot before the first epoch (0.6).
    assert (p["trainer_seconds_per_step"], p["trainer_seconds_per_epoch_end"], p["trainer_seconds_per_run"]) == (
        1.0, 3.1, 2.4)
    assert p["trainer_seconds_per_epoch"] == pytest.approx(96 * 1.0 + 3.1 + 0.24)
    assert (p["bare_seconds_per_step"], p["bare_seconds_per_run"]) == (0.8, 0.7)
    assert p["ratio"] == pytest.approx((96 + 3.1 + 0.24) / (96 * 0.8 + 0.07), abs=1e-4)
    assert p["target_met"] is False and p["overhead"] == pytest.approx(p["ratio"] - 1, abs=1e-4)


def test_overhead_callback_times_wrap_only_overridden_hooks():
    from benchmarks import overhead
    from nfnet_keras.callbacks import DivergenceMonitor

    times, monitor = overhead.CallbackTimes(), DivergenceMonitor()
    times.wrap(monitor)
    assert sorted(times.seconds) == ["DivergenceMonitor.on_batch_end", "DivergenceMonitor.on_epoch_begin"]
    # Keras still sees the train-batch hook at its default, so its dispatch does not change.
    assert getattr(monitor.on_train_batch_end, "_is_default", False)
    monitor.set_model(keras.Sequential())
    monitor.on_epoch_begin(3)
    monitor.on_batch_end(4, {"loss": float("nan")})  # the wrapped hook still does its work
    assert monitor.diverged_at == {"epoch": 4, "step": 5} and monitor.model.stop_training
    assert all(seconds > 0 for seconds in times.seconds.values())


@pytest.mark.slow
def test_overhead_smoke(tmp_path, capsys):
    from benchmarks import overhead

    saved = _run(overhead, tmp_path)
    assert saved["command"].startswith("python -m benchmarks.overhead") and saved["precision"] == "mixed_bfloat16"
    r, repeats = saved["results"], saved["settings"]["repeats"]
    for side in ("trainer", "bare"):
        _check_summary(r["seconds_per_epoch"][side], repeats)
        # An epoch (first step to epoch end) is part of its window.
        for epoch, window in zip(r["seconds_per_epoch"][side]["values"], r["seconds_per_window"][side]["values"]):
            assert epoch <= window
    epochs = r["seconds_per_epoch"]
    # The JSON rounds each time and ratio to 4 decimals: a smoke epoch of a few ms moves its quotient by percents.
    for ratio, a, b in zip(r["ratio"]["values"], epochs["trainer"]["values"], epochs["bare"]["values"]):
        assert ratio == pytest.approx(a / b, abs=a / b * (5e-5 / a + 5e-5 / b) * 1.01 + 5e-5)
    assert r["target_met"] == (r["ratio"]["median"] - 1 <= saved["target"]["overhead"])
    # The trainer's validation ran, with the EMA weights swapped in; the bare fit validates nothing.
    assert r["phases"]["validation"]["median"] > 0 and r["bare_phases"]["validation"]["median"] == 0
    for hook in ("SwapEMAWeights.on_test_begin", "StepCheckpoint.on_epoch_end", "SignalPropagationLogger.on_epoch_end",
                 "TensorBoard.on_epoch_end", "DivergenceMonitor.on_batch_end", "EpochFeed.on_epoch_begin"):
        assert r["callbacks"][hook]["n"] == repeats, hook
    assert [row["variant"] for row in r["step"]] == [name for name, _, _ in overhead.STEP_VARIANTS]
    for row in r["step"]:
        _check_summary(row["ms_per_step"], repeats)
    pipe = r["pipeline"]
    assert pipe["batches"] >= 1 and pipe["seconds_per_batch"] > 0
    out = capsys.readouterr().out
    assert f"overhead {100 * r['overhead']:.1f}%" in out
    printed = {row["phase"]: row for row in _table(out, "phase")}
    assert float(printed["validation"]["trainer"]) == pytest.approx(r["phases"]["validation"]["median"], rel=0.01,
                                                                   abs=0.01)


def test_airbench94_torch_net_matches_airbench():
    pytest.importorskip("torch")
    import torch

    from benchmarks import airbench_torch

    net = airbench_torch.airbench94_net()
    # The stem (24 x 3 x 2 x 2 + 24), the convs, BN scales and biases of the 3 groups, the 256 x 10 head.
    assert sum(p.numel() for p in net.parameters()) == 1_972_792
    frozen = [p.numel() for p in net.parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted([288] + [64, 64, 256, 256, 256, 256])  # the stem's weight and BN scales
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(m.momentum == pytest.approx(0.4) and m.eps == 1e-12 for m in norms)
    optimizer = airbench_torch.airbench94_optimizer(net, 512)
    bias_group, other_group = optimizer.param_groups
    assert bias_group["lr"] == pytest.approx(64 * other_group["lr"]) and other_group["nesterov"]
    assert len(bias_group["params"]) == 6
    x = torch.zeros(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert tuple(net(x).shape) == (2, 10)


@pytest.mark.slow
def test_airbench_torch_smoke(tmp_path, capsys):
    pytest.importorskip("torch")
    from benchmarks import airbench_torch

    saved = _run(airbench_torch, tmp_path, "--ablate")
    repeats = saved["settings"]["repeats"]
    sides = {f"keras_without_{path}" for path in airbench_torch.FAST_PATHS}
    assert set(saved["results"]) == {"keras", "torch"} | sides and set(saved["ablation"]) == sides
    for side, r in saved["ablation"].items():
        ips = {name: saved["results"][name]["images_per_s"] for name in ("keras", side, "torch")}
        assert r["over_torch"]["values"] == pytest.approx(_quotients(ips[side], ips["torch"]), rel=1e-3)
        assert r["keras_over_this"]["values"] == pytest.approx(_quotients(ips["keras"], ips[side]), rel=1e-3)
    for side in ("keras", "torch"):
        r = saved["results"][side]
        _check_summary(r["images_per_s"], repeats)
        _check_rate_is_cpu_rate_times_cores(r["images_per_s"], r["images_per_cpu_s"], r["cores_used"])
        assert np.isfinite(r["last_loss"])
    ips = {side: saved["results"][side]["images_per_s"] for side in ("keras", "torch")}
    assert saved["ratio"]["values"] == pytest.approx(_quotients(ips["keras"], ips["torch"]), rel=1e-3)
    assert saved["target_met"] == (saved["ratio"]["median"] >= saved["target"]["keras_over_torch"])
    assert saved["command"].startswith("python -m benchmarks.airbench_torch")
    printed = _table(capsys.readouterr().out, "network")
    assert [float(row["img/s median"]) for row in printed] == pytest.approx(
        [saved["results"][side]["images_per_s"]["median"] for side in saved["results"]], rel=0.01, abs=0.01)


@pytest.mark.tensorflow_only(reason="the fast paths it switches off are TensorFlow's")
def test_airbench_without_switches_one_fast_path_off_and_restores_it(monkeypatch):
    import tensorflow as tf

    from benchmarks import airbench_torch
    from nfnet_keras.layers import activations, wsconv

    monkeypatch.setattr(wsconv, "tensorflow_on_cpu_only", lambda: True)  # the rule as on a CPU
    monkeypatch.setattr(wsconv, "_cpu_lacks_bfloat16", lambda: False)  # with bfloat16 kernels
    x = tf.constant(np.linspace(-3, 3, 8), tf.bfloat16)
    fused = activations.fused_gelu
    with airbench_torch.without("tap_matmul"):
        assert not wsconv.uses_tap_matmul((2, 7, 7, 256), (3, 3, 256, 256), "bfloat16")
        assert activations.fused_gelu is fused
    assert wsconv.uses_tap_matmul((2, 7, 7, 256), (3, 3, 256, 256), "bfloat16")
    with airbench_torch.without("fused_gelu"):
        assert activations.fused_gelu is not fused
        np.testing.assert_allclose(activations.fused_gelu(x, 2.0).numpy().astype("float32"),
                                   (activations.ACTIVATIONS["gelu"](x) * 2).numpy().astype("float32"))
    assert activations.fused_gelu is fused


@pytest.mark.tensorflow_only(reason="it times TensorFlow's conv filter gradient against the tap matmuls")
def test_conv_grad_smoke(tmp_path, capsys, monkeypatch):
    from benchmarks import conv_grad
    from nfnet_keras.layers import wsconv

    monkeypatch.setattr(wsconv, "tensorflow_on_cpu_only", lambda: True)  # the rule as on a CPU
    monkeypatch.setattr(wsconv, "_cpu_lacks_bfloat16", lambda: False)  # with bfloat16 kernels
    saved = _run(conv_grad, tmp_path)
    rows = saved["rows"]
    assert [(r["positions"], r["c_in"], r["rule_takes_taps"]) for r in rows] == [("4x4", 128, True), ("6x6", 8, False)]
    for r in rows:
        for way in ("tensorflow_ms", "tap_matmul_ms"):
            _check_summary(r[way], saved["settings"]["repeats"])
        # The ratio is of the paired windows: each round's lies within the ratios of the two ways' extremes.
        taps, tensorflow = r["tap_matmul_ms"], r["tensorflow_ms"]
        for ratio in r["tap_time_over_tensorflow"]["values"]:
            assert taps["min"] / tensorflow["max"] * 0.99 <= ratio <= taps["max"] / tensorflow["min"] * 1.01
    printed = _table(capsys.readouterr().out, "dtype")
    assert [row["uses_tap_matmul takes"] for row in printed] == ["taps", "tensorflow"]


@pytest.mark.slow
def test_speed_start_measures_each_variant_every_k_steps(tmp_path, capsys):
    from benchmarks import speed_start

    data_dir = write_synthetic_cifar(tmp_path / "data", per_batch=100, test=10)
    fit_flags = ["--preset", "tiny_speed", "--batch-size", "32", "--val-size", "64", "--data-dir", data_dir,
                 "--precision", "float32"]
    with pytest.raises(SystemExit) as bad:
        speed_start.main(["--steps", "3", "--every", "2", "--", *fit_flags])
    assert bad.value.code == 2 and "--every must divide --steps" in capsys.readouterr().err
    assert speed_start.main(["--variants", "muon,sgd", "--steps", "2", "--every", "1", "--out-dir", str(tmp_path),
                             "--tag", "t", "--", *fit_flags]) == 0
    with open(tmp_path / "speed_start_t.json") as f:
        saved = json.load(f)
    assert saved["fit_flags"][:4] == ["--recipe", "speed", "--epochs", "5"]
    assert saved["fit_flags"][-len(fit_flags):] == fit_flags
    assert [run["variant"] for run in saved["runs"]] == ["muon", "sgd"]
    assert saved["runs"][1]["flags"] == ["--optimizer", "sgd"]
    for run in saved["runs"]:
        assert [p["step"] for p in run["points"]] == [1, 2]
        for point in run["points"]:
            assert 0.0 <= point["val_accuracy"] <= 1.0 and np.isfinite(point["train_loss"])
            assert len(point["var"]) == len(point["sq_mean"]) == 3 and min(point["var"]) > 0
