"""Boundary searches end: on exact bracket arithmetic, on a round budget, and a
precision finer than float64 can resolve is refused before any training."""

from conftest import run_cli

from nanlab.sweeps import boundary
from nanlab.sweeps.boundary import Bracket, geometric


def test_geometric_ends_are_exact():
    for lo, hi in [(1e-12, 1e-6), (3e-7, 0.9), (1e-300, 1e-290)]:
        lrs = geometric(lo, hi, 7)
        assert lrs[0] == lo and lrs[-1] == hi and lrs == sorted(lrs)


def _search_with(oracle, precision=0.05, lr_min=1e-12, lr_max=1e3, start=0.1):
    """Drive Bracket.next_candidates as search() does, with ``oracle(lr) -> finite``."""
    bracket, rounds = Bracket("default", "none"), 0
    while True:
        lrs = bracket.next_candidates(start, lr_min, lr_max, 16, precision)
        if not lrs:
            return bracket, rounds
        assert not set(lrs) & set(bracket.tried), "a candidate was tried twice"
        rounds += 1
        assert rounds < 100, "the search does not end"
        for lr in lrs:
            bracket.tried[lr] = oracle(lr)


def test_a_search_non_finite_at_every_lr_ends_at_lr_min():
    bracket, rounds = _search_with(lambda lr: False)
    assert bracket.hi == 1e-12 and bracket.lo is None and rounds <= 4


def test_a_search_finite_at_every_lr_ends_at_lr_max():
    bracket, _ = _search_with(lambda lr: True)
    assert bracket.lo == 1e3 and bracket.hi is None


def test_a_bracket_ends_at_its_precision_with_lo_below_hi():
    critical = 0.12345
    bracket, _ = _search_with(lambda lr: lr <= critical, precision=0.01)
    assert bracket.lo <= critical < bracket.hi and bracket.hi / bracket.lo <= 1.01


def test_a_precision_below_one_float64_step_still_ends():
    # Adjacent floats: no lr strictly inside is left to try, so the search ends.
    critical = 0.5
    bracket, _ = _search_with(lambda lr: lr <= critical, precision=1e-300)
    assert bracket.lo <= critical < bracket.hi


def test_the_round_budget_is_a_backstop(monkeypatch):
    from types import SimpleNamespace

    class FakeEngine:
        """Trains nothing: an lr stays finite iff it is at most 0.3."""

        def prepare(self, run):
            return SimpleNamespace(plan="not batched")

        def calibrate(self, prepared):
            pass

        def schedule(self, runs):
            return SimpleNamespace(runs=runs, tally=lambda: {})

        def train(self, schedule):
            return [SimpleNamespace(result=SimpleNamespace(first_nonfinite=None if run.cfg <= 0.3 else 1))
                    for run in schedule.runs]

    monkeypatch.setattr(boundary, "MAX_ROUNDS", 2)
    said = []
    settings = SimpleNamespace(lr_min=1e-12, lr_max=1e3, candidates=16, precision=1e-6)
    brackets = boundary.search(FakeEngine(), "broken", lambda init, clip, lr: lr, [("default", "none")],
                               settings, 0.1, out=said.append)
    assert len([s for s in said if s.startswith("round ")]) == 2 and "stopped after 2 rounds" in said[-1]
    assert brackets[0].lo <= 0.3 < brackets[0].hi


def test_a_precision_float64_cannot_resolve_is_refused_in_one_line(tmp_path):
    done = run_cli("mode=boundary", "scenario=tanh_explosion", "boundary.precision=1e-300",
                   f"hydra.run.dir={tmp_path}", timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "boundary.precision" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_scenario_non_finite_at_every_lr_ends(tmp_path):
    """exploding_init at 5 steps goes non-finite at every lr: the search looked for
    lr_min forever, as exp(log(1e-12)) is not 1e-12."""
    done = run_cli("mode=boundary", "scenario=exploding_init", "steps=5", f"hydra.run.dir={tmp_path}", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "(non-finite at every lr tried)" in done.stdout


def test_a_lost_round_chunk_ends_the_search_in_one_line_with_exit_1(tmp_path, monkeypatch, capsys):
    """Two workers share the first round, a chunk for each clip; the one handed
    clip=norm's lrs is killed (SIGKILL) while training them. The search cannot
    narrow without them: one line names the lost lrs and why, exit status 1, no
    traceback, no boundary.json. Without the kill the same search ends as usual."""
    import os
    import signal

    from nanlab.config.compose import compose
    from nanlab.sweeps import engine as batched

    parent, real = os.getpid(), batched.Engine.train

    def train(self, schedule):
        if os.getpid() != parent and schedule.runs[0].cfg.clip.name == "norm":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, schedule)

    monkeypatch.setattr(batched.Engine, "train", train)
    overrides = ["mode=boundary", "scenario=tanh_explosion", "steps=5", "boundary.clip=[none,norm]", "sweep.workers=2"]
    code = boundary.run_boundary(compose(overrides), tmp_path, overrides)
    out, err = capsys.readouterr()
    assert code == 1 and "round 1" not in out and not (tmp_path / boundary.BOUNDARY_JSON).exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("nanlab: error: boundary: 16 candidate lrs (") and "init/clip default/norm)" in err
    assert "died, exit code -9" in err and "running the command again repeats the search" in err

    monkeypatch.setattr(batched.Engine, "train", real)  # the same search with no worker lost ends
    assert boundary.run_boundary(compose(overrides), tmp_path, overrides) == 0
    assert (tmp_path / boundary.BOUNDARY_JSON).exists() and capsys.readouterr().err == ""
