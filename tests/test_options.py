"""Each optimizer, init and clipping option does what torch's own API does: the
shared loop's losses equal a hand-written torch loop's, step for step."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanlab
from nanlab.config.compose import compose
from nanlab.lab.scenario import Context
from nanlab.scenarios import tanh_explosion

STEPS = 15


def hand_written_losses(overrides, configure):
    """The broken variant of tanh_explosion, trained by plain torch code."""
    cfg = compose(["scenario=tanh_explosion", *overrides])
    data = tanh_explosion.make_data(Context(cfg, torch.device("cpu"), torch.float32))
    x, y = data.x.float(), data.y.float()
    torch.manual_seed(int(cfg.seed))
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt, clip = configure(model)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        clip(model.parameters())
        opt.step()
        losses.append(loss.item())
    return losses


def no_clip(params):
    return None


def xavier(model):
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


CASES = {
    "clip=value": (["clip=value", "clip.threshold=0.01"],
                   lambda m: (torch.optim.SGD(m.parameters(), lr=0.2), lambda p: nn.utils.clip_grad_value_(p, 0.01))),
    "optimizer=rmsprop": (["optimizer=rmsprop", "optimizer.lr=0.01", "optimizer.momentum=0.5"],
                          lambda m: (torch.optim.RMSprop(m.parameters(), lr=0.01, eps=1e-8, momentum=0.5), no_clip)),
    "init=xavier_uniform": (["init=xavier_uniform"],
                            lambda m: (xavier(m) or torch.optim.SGD(m.parameters(), lr=0.2), no_clip)),
    "clip=norm": (["clip=norm", "clip.threshold=0.5"],
                  lambda m: (torch.optim.SGD(m.parameters(), lr=0.2), lambda p: nn.utils.clip_grad_norm_(p, 0.5))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_matches_plain_torch(name):
    overrides, configure = CASES[name]
    ours = nanlab.run("tanh_explosion", *overrides, f"steps={STEPS}").variant("sgd_large_lr")
    theirs = hand_written_losses(overrides, configure)
    assert ours.losses[: len(theirs)] == pytest.approx(theirs, rel=1e-6, nan_ok=True)
    assert ours.overrides == {} and len(ours.losses) == STEPS


def test_options_change_the_run():
    """Guard against the cases above passing because nothing was applied at all."""
    plain = nanlab.run("tanh_explosion", f"steps={STEPS}").variant("sgd_large_lr").losses
    for overrides, _ in CASES.values():
        assert nanlab.run("tanh_explosion", *overrides, f"steps={STEPS}").variant("sgd_large_lr").losses != plain
