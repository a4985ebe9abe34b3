"""experiments.grid: planning, states, skipping what is done, resuming, failures, refusal of bad grids, and the
submitit launcher (its local executor). Units are real entry-point commands when planned; the launcher tests run
stand-in commands (a few lines of Python) so they take seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import grid as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """
import ml_collections

def get_config():
    g = ml_collections.ConfigDict()
    g.name = "t"
    g.preset = "tiny"
    g.overrides = {"train": {"epochs": 4}, "checkpoint": {"snapshot_every": 2}}
    g.runs = [dict(label="a", config="pgd_at"),
              dict(label="b", config="trades", seed=3, overrides={"trades.beta": 1.0, "optimizer.lr": 0.1})]
    g.measures = {"rloss": dict(snapshots="all", subsets=("test_first1000",), n_examples=64, pgd_steps=2, restarts=1),
                  "avg": dict(snapshots="last", samples=2, n_examples=64, reference_restarts=1, nu_per="dataset"),
                  "autoattack": dict(snapshots="last,best", version="fast", n_examples=64, n_iter=5)}
    return g
"""


def _grid(tmp_path, text=GOOD, name="g.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_plan_lists_training_then_measurements_with_real_commands(tmp_path):
    runs, units = G.plan(G.load_grid(_grid(tmp_path)), str(tmp_path / "root"), "DATA", python="PY")
    assert [r.label for r in runs] == ["a", "b"]
    assert runs[1].seed == 3 and runs[1].epochs == 4 and runs[1].method == "trades"
    names = [u.name for u in units]
    assert names[:6] == ["a/train", "a/rloss_test_first1000_ep2", "a/rloss_test_first1000_ep4",
                         "a/autoattack_last", "a/avg_last", "a/autoattack_best"]
    assert names[6] == "b/train" and len(units) == 12
    train_b = units[6]
    assert train_b.command[:4] == ["PY", "-m", "experiments.cifar10_at", "--config=experiments/configs/trades.py:tiny"]
    assert "--config.trades.beta=1.0" in train_b.command and "--config.optimizer.lr=0.1" in train_b.command
    assert "--config.seed=3" in train_b.command and "--config.train.epochs=4" in train_b.command
    assert train_b.command[train_b.command.index("--data-dir") + 1] == "DATA"
    avg = units[4]
    assert avg.after == "a/train" and avg.command[2] == "experiments.flatness"
    assert avg.command[avg.command.index("--snapshot") + 1] == "last"
    assert avg.command[avg.command.index("--nu-per") + 1] == "dataset"
    assert all(u.state == "to do" for u in units)


def test_the_planned_commands_parse(tmp_path):
    """Every measurement command is accepted by its entry point's own parser (no misspelt option)."""
    from experiments import evaluate, flatness, robust_loss

    parsers = {"experiments.evaluate": evaluate.build_parser(), "experiments.flatness": flatness.build_parser(),
               "experiments.robust_loss": robust_loss.build_parser()}
    _, units = G.plan(G.load_grid(_grid(tmp_path)), str(tmp_path / "root"), "DATA")
    for u in units:
        if u.kind != "train":
            parsers[u.command[2]].parse_args(u.command[3:])


def test_states_follow_the_files(tmp_path):
    root = tmp_path / "root"
    path = _grid(tmp_path)
    (root / "a" / "checkpoints" / "latest").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "DONE").write_text("x")
    (root / "a" / "evaluations").mkdir()
    (root / "a" / "evaluations" / "grid_rloss_test_first1000_ep2.json").write_text("{}")
    (root / "a" / "evaluations" / "grid_autoattack_last.examples.json").write_text("{}")
    (root / "a" / "flatness" / ".partial" / "grid_avg_xi0.5_last-0123abcd").mkdir(parents=True)
    (root / "b" / "flatness" / ".partial" / "something_else-0123").mkdir(parents=True)
    _, units = G.plan(G.load_grid(path), str(root), None)
    state = {u.name: u.state for u in units}
    assert state["a/train"] == "partial" and state["b/train"] == "done"
    assert state["a/rloss_test_first1000_ep2"] == "done" and state["a/rloss_test_first1000_ep4"] == "to do"
    assert state["a/autoattack_last"] == "partial" and state["a/autoattack_best"] == "to do"
    assert state["a/avg_last"] == "partial" and state["b/avg_last"] == "to do"


def _unit(tmp_path, name, kind, code, after=None, out=None):
    out = out or str(tmp_path / f"{name.replace('/', '_')}.out")
    return G.Unit(name, name.split("/")[0], kind, [sys.executable, "-c", code], [out], [out + ".part"],
                  str(tmp_path / "logs" / f"{name.replace('/', '_')}.log"), 1.0, after)


def _writer(path, fail_once=False):
    """A stand-in unit: writes a part file, then (unless failing the first time) the result."""
    return textwrap.dedent(f"""
        import os, sys
        part = {path!r} + ".part"
        first = not os.path.exists(part)
        open(part, "a").write("x")
        if {fail_once!r} and first:
            sys.exit(3)
        open({path!r}, "w").write(str(len(open(part).read())))
    """)


def test_local_launcher_skips_done_units_resumes_partial_ones_and_reports_failures(tmp_path):
    out = {k: str(tmp_path / f"{k}.out") for k in ("t", "m1", "m2", "t2", "m3")}
    units = [_unit(tmp_path, "r/train", "train", _writer(out["t"]), out=out["t"]),
             _unit(tmp_path, "r/m1", "rloss", _writer(out["m1"], fail_once=True), "r/train", out["m1"]),
             _unit(tmp_path, "r/m2", "rloss", "raise SystemExit('must not run')", "r/train", out["m2"]),
             _unit(tmp_path, "s/train", "train", "import sys; sys.exit(1)", out=out["t2"]),
             _unit(tmp_path, "s/m3", "rloss", _writer(out["m3"]), "s/train", out["m3"])]
    open(out["m2"], "w").write("done before")
    for u in units:
        u.state = G.unit_state(u)
    assert [u.state for u in units] == ["to do", "to do", "done", "to do", "to do"]
    failed = G.run_local(units, log=lambda m: None)
    assert sorted(u.name for u in failed) == ["r/m1", "s/train"]
    # a training unit's result is the DONE marker the launcher writes after a successful exit
    assert os.path.exists(out["t"]) and not os.path.exists(out["t2"])
    assert not os.path.exists(out["m3"])  # s/m3 skipped: its training failed
    assert open(units[1].log).read().count("$ ") == 1  # the command line is logged
    # rerun: done units are not run again; the interrupted unit sees its partial work and finishes
    for u in units:
        u.state = G.unit_state(u)
    assert units[1].state == "partial" and units[0].state == "done"
    failed = G.run_local(units, log=lambda m: None)
    assert [u.name for u in failed] == ["s/train"]
    assert open(out["m1"]).read() == "2"  # the second attempt continued from the first one's part file
    assert open(out["t"] + ".part").read() == "x"   # training was not redone


def test_training_unit_done_marker_written_only_on_success(tmp_path):
    marker = str(tmp_path / "DONE")
    assert G.run_unit([sys.executable, "-c", "import sys; sys.exit(2)"], str(tmp_path / "l.log"), marker) == 2
    assert not os.path.exists(marker)
    assert G.run_unit([sys.executable, "-c", "print('hi')"], str(tmp_path / "l.log"), marker) == 0
    assert os.path.exists(marker) and "hi" in open(tmp_path / "l.log").read()


def test_submitit_local_executor_runs_training_before_its_measurements(tmp_path):
    pytest.importorskip("submitit")
    out = {k: str(tmp_path / f"{k}.out") for k in ("t", "m", "t2", "m2")}
    check = textwrap.dedent(f"""
        import os, sys
        if not os.path.exists({out['t']!r}):
            sys.exit(4)
        open({out['m']!r}, "w").write("after training")
    """)
    units = [_unit(tmp_path, "r/train", "train", _writer(out["t"]), out=out["t"]),
             _unit(tmp_path, "r/m", "rloss", check, "r/train", out["m"]),
             _unit(tmp_path, "s/train", "train", "import sys; sys.exit(1)", out=out["t2"]),
             _unit(tmp_path, "s/m", "rloss", _writer(out["m2"]), "s/train", out["m2"])]
    failed = G.run_submitit(units, str(tmp_path / "submitit"), cluster="local", time_min=5, log=lambda m: None)
    assert open(out["m"]).read() == "after training"
    assert [u.name for u in failed] == ["s/train"] and not os.path.exists(out["m2"])


BAD = {
    "unknown method": ('dict(label="a", config="pgd_att")', "unknown method config 'pgd_att'"),
    "duplicate label": ('dict(label="a", config="pgd_at"), dict(label="a", config="mart")', "duplicate run label"),
    "unknown override": ('dict(label="a", config="pgd_at", overrides={"optimizer.lrr": 0.1})',
                         "override 'optimizer.lrr' does not exist"),
    "unknown measure": ('dict(label="a", config="pgd_at")', "unknown measure 'flatnes'"),
    "ema weights of a run without averaging": ('dict(label="a", config="pgd_at", weights="ema")',
                                               "weights ema needs a run that averages its weights"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_grids_are_refused_before_anything_runs(tmp_path, case):
    runs, expected = BAD[case]
    measures = '{"flatnes": {}}' if case == "unknown measure" else '{"rloss": {}}'
    text = f"""
import ml_collections

def get_config():
    g = ml_collections.ConfigDict()
    g.preset = "tiny"
    g.runs = [{runs}]
    g.measures = {measures}
    return g
"""
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "experiments.grid", _grid(tmp_path, text), "--root", str(root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not root.exists()  # nothing ran, nothing written


def test_dry_run_lists_units_states_and_estimate(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.grid", _grid(tmp_path), "--root",
                           str(tmp_path / "root"), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["a/train", "to"] and "12 units: 0 done, 0 stale, 0 partial, 12 to do" in lines[-1]
    assert not (tmp_path / "root").exists()


def test_grid_record_for_the_report(tmp_path):
    g = G.load_grid(_grid(tmp_path))
    runs = G.build_runs(g)
    rec = G.grid_record(g, runs, "g.py")
    json.dumps(rec)
    assert [r["label"] for r in rec["runs"]] == ["a", "b"] and rec["runs"][1]["overrides"]["trades.beta"] == 1.0
    assert rec["measures"]["avg"]["samples"] == 2


def _saves_on_sigterm(flag: str, seconds: int) -> str:
    """A stand-in unit that marks ``flag.started``, then sleeps; on SIGTERM it writes "saved" to ``flag`` (as the
    trainer saves a checkpoint) and exits 143."""
    return textwrap.dedent(f"""
        import signal, sys, time
        def bye(*a):
            open({flag!r}, "w").write("saved")
            sys.exit(143)
        signal.signal(signal.SIGTERM, bye)
        open({flag!r} + ".started", "w").write("1")
        time.sleep({seconds})
    """)


def test_stopping_the_grid_stops_the_unit_in_flight(tmp_path):
    """A stopped grid (Ctrl-C, SIGTERM) sends SIGTERM to the running unit and waits for it (the trainer then saves and
    exits); no unit is left running on its own, and no further unit starts."""
    import threading

    flag = str(tmp_path / "got_sigterm")
    code = _saves_on_sigterm(flag, 60)
    units = [_unit(tmp_path, "r/train", "train", code), _unit(tmp_path, "r/m", "rloss", _writer(str(tmp_path / "m")),
                                                               "r/train", str(tmp_path / "m"))]
    t = threading.Thread(target=G.run_local, args=(units,), kwargs={"workers": 2, "log": lambda m: None})
    t.start()
    import time

    deadline = time.time() + 120  # a loaded machine starts a Python process slowly
    while not os.path.exists(flag + ".started") and time.time() < deadline:
        time.sleep(0.05)
    G._STOPPING.set()
    try:
        G.stop_children(timeout=20)
        t.join(timeout=20)
    finally:
        G._STOPPING.clear()
    assert open(flag).read() == "saved" and not G._LIVE and not t.is_alive()
    assert not os.path.exists(str(tmp_path / "m"))  # the measurement did not start after the stop


def test_parallel_queue_keeps_one_training_ahead(tmp_path):
    units = [_unit(tmp_path, f"{r}/{k}", "train" if k == "train" else "rloss", "pass", None if k == "train" else
                   f"{r}/train") for r in ("a", "b", "c") for k in ("train", "m1", "m2")]
    assert [u.name for u in G.training_ahead(units)] == [
        "a/train", "b/train", "a/m1", "a/m2", "c/train", "b/m1", "b/m2", "c/m1", "c/m2"]
    done_a = [u for u in units if u.name != "a/train"]  # a's training already done
    assert [u.name for u in G.training_ahead(done_a)][:3] == ["b/train", "a/m1", "a/m2"]


def test_parallel_workers_never_wait_on_a_training_while_another_unit_can_run(tmp_path):
    """Two workers, queue a/train, b/train, a/m, c/train, b/m, c/m: while a's training runs, the other worker runs
    b's and then c's training (b's and c's measurements when they can start) instead of waiting for a/m's training.
    Each stand-in writes its start and end times."""
    stamp = "import sys, time; open(sys.argv[1], 'a').write(f'{{time.time()}} '); time.sleep({}); " \
            "open(sys.argv[1], 'a').write(f'{{time.time()}}'); open(sys.argv[1][:-2], 'w').write('ok')"
    units = []
    for run, slow in (("a", 3.0), ("b", 0.2), ("c", 0.2)):
        for kind in ("train", "m"):
            out = str(tmp_path / f"{run}_{kind}.out")
            u = _unit(tmp_path, f"{run}/{kind}", "train" if kind == "train" else "rloss",
                      stamp.format(slow if kind == "train" else 0.1), None if kind == "train" else f"{run}/train", out)
            u.command.append(out + ".t")  # the stamps (a training's output is the launcher's DONE marker)
            units.append(u)
    for u in units:
        u.state = G.unit_state(u)
    assert G.run_local(units, workers=2, log=lambda m: None) == []
    t = {u.name: [float(v) for v in open(u.outputs[0] + ".t").read().split()] for u in units}
    # b and c trained and were measured while a still trained
    assert max(t["b/m"][1], t["c/m"][1]) < t["a/train"][1], t
    assert t["a/m"][0] >= t["a/train"][1]


def test_estimates_follow_the_measured_time_of_done_units(tmp_path):
    path = _grid(tmp_path)
    root = tmp_path / "root"
    _, units = G.plan(G.load_grid(path), str(root), None)
    u = next(x for x in units if x.name == "a/rloss_test_first1000_ep2")
    os.makedirs(os.path.dirname(u.outputs[0]))
    with open(u.outputs[0], "w") as f:
        json.dump({"time_s": 3 * u.cost}, f)
    (root / "a" / "DONE").write_text("x")
    with open(root / "a" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 1, "time_s": 2.0}) + "\n" + json.dumps({"epoch": 2, "time_s": 3.0}) + "\n")
    _, units = G.plan(G.load_grid(path), str(root), None)
    scale = G.calibrate(units)
    train_a = next(x for x in units if x.name == "a/train")
    assert scale["rloss"] == pytest.approx(3.0) and scale["train"] == pytest.approx(5.0 / train_a.cost)
    assert "avg" not in scale


def test_grid_eps_reaches_every_measure(tmp_path):
    text = GOOD.replace('g.preset = "tiny"', 'g.preset = "tiny"\n    g.eps = 4 / 255')
    text = text.replace('"avg": dict(snapshots="last",', '"avg": dict(eps=0.01, snapshots="last",')
    _, units = G.plan(G.load_grid(_grid(tmp_path, text)), str(tmp_path / "root"), None)
    for u in units:
        if u.kind != "train":
            want = "0.01" if u.kind == "avg" else repr(4 / 255)
            assert u.command[u.command.index("--eps") + 1] == want, u.name
    assert "--eps" not in units[0].command


def test_a_run_measured_with_its_averaged_weights(tmp_path):
    """weights="ema": every measure of that run takes --weights ema (the average and its own batch-norm
    statistics), and the commands parse; other runs measure their raw weights."""
    from experiments import evaluate, flatness, robust_loss

    text = GOOD.replace('dict(label="a", config="pgd_at")', 'dict(label="a", config="ema", weights="ema")')
    _, units = G.plan(G.load_grid(_grid(tmp_path, text)), str(tmp_path / "root"), None)
    parsers = {"experiments.evaluate": evaluate.build_parser(), "experiments.flatness": flatness.build_parser(),
               "experiments.robust_loss": robust_loss.build_parser()}
    for u in units:
        if u.kind == "train":
            assert "--weights" not in u.command
            continue
        want = ["--weights", "ema"] if u.run == "a" else []
        i = u.command.index("--weights") if "--weights" in u.command else None
        assert (u.command[i:i + 2] if i is not None else []) == want, u.name
        assert parsers[u.command[2]].parse_args(u.command[3:]).weights == (want[1] if want else "params")


ES_GRID = GOOD.replace('"avg": dict(snapshots="last",', '"avg": dict(snapshots="2,4,best",')


def _es_plan(tmp_path, log: dict):
    """ES_GRID (avg at epochs 2, 4 and the early-stopped model) planned in ``tmp_path/root``, with run a's training
    log ``{epoch: es_robust_error or None}``; returns the root and the units by name."""
    root = tmp_path / "root"
    _, units = G.plan(G.load_grid(_grid(tmp_path, ES_GRID)), str(root), None)
    (root / "a").mkdir(parents=True)
    with open(root / "a" / "metrics.jsonl", "w") as f:
        for e, err in log.items():
            f.write(json.dumps({"epoch": e, **({"es_robust_error": err} if err is not None else {})}) + "\n")
    return root, {u.name: u for u in units}


def test_early_stopped_model_reuses_the_result_of_its_snapshot(tmp_path):
    # ES: the first epoch with the lowest es_robust_error
    root, by = _es_plan(tmp_path, {1: None, 2: 0.5, 3: None, 4: 0.5})
    best = by["a/avg_best"]
    assert best.same_as == {2: "a/avg_ep2", 4: "a/avg_ep4"}
    assert by["a/autoattack_best"].same_as == {4: "a/autoattack_last"}
    assert G.es_epoch(str(root / "a")) == 2
    assert G.reuse_same_model(best, by) is None  # epoch 2 not measured yet: compute
    os.makedirs(os.path.dirname(by["a/avg_ep2"].outputs[0]))
    with open(by["a/avg_ep2"].outputs[0], "w") as f:
        json.dump({"flatness": 0.7, "epoch": 2, "snapshot": "2"}, f)
    assert G.reuse_same_model(best, by) == "a/avg_ep2"
    copied = json.load(open(best.outputs[0]))
    assert copied["flatness"] == 0.7 and copied["epoch"] == 2 and copied["snapshot"] == "best"
    assert G.unit_state(best) == "done"


def test_a_result_made_with_other_settings_is_stale_and_recomputed_fresh(tmp_path):
    path = _grid(tmp_path)
    root = tmp_path / "root"
    _, units = G.plan(G.load_grid(path), str(root), "DATA")
    u = next(x for x in units if x.name == "a/avg_last")
    os.makedirs(os.path.dirname(u.outputs[0]))
    open(u.outputs[0], "w").write("{}")
    assert G.unit_state(u) == "done"  # no settings recorded (older grid, or by hand): taken as done
    G.record_settings(u.command, u.log)
    _, units = G.plan(G.load_grid(path), str(root), "ELSEWHERE")  # another data location: the same result
    assert next(x for x in units if x.name == "a/avg_last").state == "done"
    changed = path.replace("g.py", "g2.py")
    open(changed, "w").write(open(path).read().replace("samples=2", "samples=3"))
    _, units = G.plan(G.load_grid(changed), str(root), "DATA")
    stale = next(x for x in units if x.name == "a/avg_last")
    assert stale.state == "stale" and stale.command[-1] == "--fresh"
    G.record_settings(stale.command, stale.log)  # after the rerun
    _, units = G.plan(G.load_grid(changed), str(root), "DATA")
    assert next(x for x in units if x.name == "a/avg_last").state == "done"


def test_snapshot_order_trains_every_run_then_measures_final_then_best_then_the_other_epochs(tmp_path):
    _, units = G.plan(G.load_grid(_grid(tmp_path, ES_GRID)), str(tmp_path / "root"), None)
    names = [u.name for u in G.snapshot_ahead(units)]
    assert names[:2] == ["a/train", "b/train"] and sorted(names) == sorted(u.name for u in units)
    stage = {n: i for i, n in enumerate(names)}
    finals = [n for n in names if n.endswith(("_ep4", "_last"))]
    bests = [n for n in names if n.endswith("_best")]
    others = [n for n in names if n.endswith("_ep2")]
    assert finals and bests and others
    assert max(stage[n] for n in finals) < min(stage[n] for n in bests)
    assert max(stage[n] for n in bests) < min(stage[n] for n in others)
    assert [n.split("/")[0] for n in finals] == sorted(n.split("/")[0] for n in finals)  # run order within a stage
    with pytest.raises(G.GridError, match="unknown order"):
        G.run_local(units, order="breadth")


def test_a_snapshot_that_is_the_early_stopped_model_reuses_the_result_of_best(tmp_path):
    """--order snapshot measures the early-stopped model first: the snapshot of the same epoch copies its result."""
    _, by = _es_plan(tmp_path, {2: 0.4, 4: 0.5})
    assert G.reuse_same_model(by["a/avg_ep2"], by) is None  # best not measured yet: compute
    os.makedirs(os.path.dirname(by["a/avg_best"].outputs[0]))
    with open(by["a/avg_best"].outputs[0], "w") as f:
        json.dump({"flatness": 0.3, "epoch": 2, "snapshot": "best"}, f)
    assert G.reuse_same_model(by["a/avg_ep4"], by) is None  # another epoch: compute
    assert G.reuse_same_model(by["a/avg_ep2"], by) == "a/avg_best"
    copied = json.load(open(by["a/avg_ep2"].outputs[0]))
    assert copied["flatness"] == 0.3 and copied["epoch"] == 2 and copied["snapshot"] == "2"
    assert G.unit_state(by["a/avg_ep2"]) == "done"
    assert not os.path.exists(by["a/avg_ep4"].outputs[0])


def test_flatness_commands_name_their_pgd_step_rule_so_results_of_the_old_fixed_step_are_stale(tmp_path):
    """avg/worst/landscape commands always say --pgd-step-rule (default scaled); rloss only when the grid asks. A
    flatness result recorded with the command of before (no rule named, the fixed 0.007 step) is stale."""
    text = GOOD.replace('"avg": dict(snapshots="last",', '"avg": dict(eps=4 / 255, snapshots="last",')
    root = tmp_path / "root"
    _, units = G.plan(G.load_grid(_grid(tmp_path, text)), str(root), None)
    avg = next(u for u in units if u.name == "a/avg_last")
    assert avg.command[avg.command.index("--pgd-step-rule") + 1] == "scaled"
    assert not any("--pgd-step-rule" in u.command for u in units if u.kind in ("rloss", "autoattack", "train"))
    from experiments import flatness

    args = flatness.build_parser().parse_args(avg.command[3:])
    assert flatness.make_config(args).attack.step_size == pytest.approx(0.007 / 2)
    os.makedirs(os.path.dirname(avg.outputs[0]))
    open(avg.outputs[0], "w").write("{}")
    i = avg.command.index("--pgd-step-rule")
    G.record_settings(avg.command[:i] + avg.command[i + 2:], avg.log)  # as the grid recorded it before
    _, units = G.plan(G.load_grid(_grid(tmp_path, text)), str(root), None)
    assert next(u for u in units if u.name == "a/avg_last").state == "stale"
    fixed = text.replace('"rloss": dict(snapshots="all",', '"rloss": dict(pgd_step_rule="fixed", snapshots="all",')
    _, units = G.plan(G.load_grid(_grid(tmp_path, fixed, "g2.py")), str(root), None)
    rloss = next(u for u in units if u.kind == "rloss")
    assert rloss.command[rloss.command.index("--pgd-step-rule") + 1] == "fixed"
    with pytest.raises(G.GridError, match="pgd_step_rule 'scald'"):
        G.plan(G.load_grid(_grid(tmp_path, fixed.replace('"fixed"', '"scald"'), "g3.py")), str(root), None)


def test_a_stop_is_prompt_while_a_measurement_runs_inside_the_grid_process(tmp_path):
    """SIGTERM (or Ctrl-C) ends ``python -m experiments.grid`` at once with status 130 even when a measurement runs
    in-process in a worker thread (which cannot be interrupted), and stops the unit processes cleanly."""
    import signal
    import time

    (tmp_path / "sleeper_unit.py").write_text(textwrap.dedent(f"""
        import time
        def main(argv):
            open({str(tmp_path / "inproc.started")!r}, "w").write("1")
            time.sleep(120)
            open({str(tmp_path / "inproc.finished")!r}, "w").write("1")
    """))
    flag = str(tmp_path / "child_sigterm")
    child = _saves_on_sigterm(flag, 120)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from experiments import grid as G
        inproc = G.Unit("r/m", "r", "rloss", [sys.executable, "-m", "sleeper_unit"], [{str(tmp_path / "m")!r}], [],
                        {str(tmp_path / "logs" / "m.log")!r}, 1.0, None)
        proc = G.Unit("r/p", "r", "rloss", [sys.executable, "-c", {child!r}], [{str(tmp_path / "p")!r}], [],
                      {str(tmp_path / "logs" / "p.log")!r}, 1.0, None)
        G.main = lambda argv=None: 1 if G.run_local([inproc, proc], workers=2, log=print) else 0
        G.cli([])
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120  # a loaded machine starts Python processes slowly
    while not (os.path.exists(tmp_path / "inproc.started") and os.path.exists(flag + ".started")):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.1)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and time.time() - t0 < 30, (out, err)
    assert "interrupted: finished units are kept" in err and "Traceback" not in err
    assert open(flag).read() == "saved"  # the unit process got SIGTERM and saved
    assert not os.path.exists(tmp_path / "inproc.finished")  # nobody waited for the in-process unit


def test_the_early_stopped_model_does_not_copy_a_stale_result(tmp_path):
    """A snapshot's result made with other settings (stale, to be recomputed) is not copied to the early-stopped
    model of the same epoch; once recomputed, it is."""
    _, by = _es_plan(tmp_path, {2: 0.5})
    ep2 = by["a/avg_ep2"]
    os.makedirs(os.path.dirname(ep2.outputs[0]))
    with open(ep2.outputs[0], "w") as f:
        json.dump({"flatness": 0.7, "epoch": 2, "snapshot": "2"}, f)
    G.record_settings([*ep2.command[:-1], "other"], ep2.log)
    assert G.unit_state(ep2) == "stale" and G.reuse_same_model(by["a/avg_best"], by) is None
    G.record_settings(ep2.command, ep2.log)  # recomputed
    assert G.reuse_same_model(by["a/avg_best"], by) == "a/avg_ep2"
