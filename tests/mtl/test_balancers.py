"""Loss balancers and gradient aggregators on a tiny generic multi-task model (shared trunk + heads)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torchjd.aggregation import MGDA, Constant, PCGrad, Sum, UPGrad
from torchjd.autojac import jac, jac_to_grad, mtl_backward

from dualhead.mtl.balancers import (
    BALANCERS,
    DBMTL,
    FAMO,
    DynamicWeightAverage,
    GradNorm,
    JacobianAggregation,
    UncertaintyWeighting,
    build_balancer,
)

TWO = ["binary", "open"]
THREE = ["binary", "open", "count"]
AGGREGATION_NAMES = ["pcgrad", "upgrad", "mgda"]


class TinyMTL(nn.Module):
    """Shared MLP trunk, one linear head per task, squared-error losses (all positive)."""

    def __init__(self, tasks: list[str], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleDict({task: nn.Linear(6, 1) for task in tasks})

    def losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], present):
        features = self.trunk(x)
        losses = {t: (self.heads[t](features).squeeze(-1) - targets[t]).pow(2).mean() + 0.1 for t in present}
        return features, losses


def batch(tasks, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=generator)
    return x, {task: torch.randn(7, generator=generator) * (i + 1) for i, task in enumerate(tasks)}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def step(model, balancer, present, seed, **kwargs):
    """One balancer backward on a fresh batch; returns the report."""
    x, targets = batch(list(model.heads), seed)
    features, losses = model.losses(x, targets, present)
    return balancer.backward(
        losses, shared_params=list(model.trunk.parameters()), shared_features=features, **kwargs
    )


def assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=0, atol=0, msg=key)


@pytest.fixture(autouse=True)
def _quiet_cvxpy():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not DPP.*")
        yield


@pytest.mark.parametrize("name", sorted(BALANCERS))
@pytest.mark.parametrize("tasks", [TWO, THREE], ids=["two", "three"])
def test_every_method_trains_with_partial_labels_and_round_trips(name, tasks):
    model = TinyMTL(tasks)
    balancer = build_balancer(name, tasks)
    groups = [{"params": model.parameters()}]
    if list(balancer.parameters()):
        groups.append({"params": balancer.parameters(), "lr": balancer.lr, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=1e-2)
    before = copy.deepcopy(model.state_dict())
    schedule = [tasks, tasks, tasks[:1], tasks[1:], tasks, tasks[::2], tasks]
    for i, present in enumerate(schedule):
        balancer.set_epoch(i // 2)
        optimizer.zero_grad()
        report = step(model, balancer, present, seed=i)
        assert list(report.weights) == [t for t in tasks if t in present]
        assert math.isfinite(report.loss) and all(math.isfinite(w) for w in report.weights.values())
        for task in tasks:  # heads of absent tasks get no gradient
            assert (model.heads[task].weight.grad is not None) == (task in present)
        optimizer.step()
    after = model.state_dict()
    assert not torch.equal(before["trunk.0.weight"], after["trunk.0.weight"])
    for task in tasks:
        assert not torch.equal(before[f"heads.{task}.weight"], after[f"heads.{task}.weight"])

    # The state dict carries the whole state: a rebuilt balancer continues identically.
    restored = build_balancer(name, tasks)
    restored.load_state_dict(balancer.state_dict())
    assert_state_equal(restored.state_dict(), balancer.state_dict())
    results = []
    for candidate in (balancer, restored):
        twin = copy.deepcopy(model)
        twin.zero_grad()
        torch.manual_seed(123)
        report = step(twin, candidate, tasks, seed=99)
        results.append((report.weights, grads(twin)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for key, value in results[0][1].items():
        torch.testing.assert_close(value, results[1][1][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_single_present_task_is_a_plain_weighted_backward(name):
    model = TinyMTL(THREE)
    balancer = build_balancer(name, THREE)
    step(model, balancer, THREE, seed=0)  # some state first
    model.zero_grad()
    report = step(model, balancer, ["open"], seed=1)
    got = grads(model)
    reference = TinyMTL(THREE)
    reference.load_state_dict(model.state_dict())
    x, targets = batch(THREE, 1)
    _, losses = reference.losses(x, targets, ["open"])
    loss = torch.log(losses["open"] + balancer.eps) if name == "db_mtl" else losses["open"]
    (report.weights["open"] * loss).backward()
    assert got.keys() == grads(reference).keys()
    for key, value in grads(reference).items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
@pytest.mark.parametrize("aggregator", [PCGrad, UPGrad, MGDA], ids=AGGREGATION_NAMES)
def test_wrapper_matches_direct_torchjd(aggregator, mode):
    name = AGGREGATION_NAMES[[PCGrad, UPGrad, MGDA].index(aggregator)]
    model = TinyMTL(TWO)
    direct = copy.deepcopy(model)
    torch.manual_seed(5)
    step(model, build_balancer(name, TWO, mode=mode), TWO, seed=3)

    x, targets = batch(TWO, 3)
    features, losses = direct.losses(x, targets, TWO)
    trunk = list(direct.trunk.parameters())
    torch.manual_seed(5)
    if mode == "parameters":
        mtl_backward(list(losses.values()), features=features, shared_params=trunk)
        jac_to_grad(trunk, aggregator())
    else:
        (jacobian,) = jac(list(losses.values()), [features], retain_graph=True)
        direction = aggregator()(jacobian.reshape(2, -1))
        features.backward(direction.reshape(features.shape), retain_graph=True)
        heads = list(direct.heads.parameters())
        torch.autograd.backward(sum(losses.values()), inputs=heads)
    expected = grads(direct)
    got = grads(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregator", [Sum(), Constant(torch.tensor([0.3, 0.7]))], ids=["sum", "constant"])
def test_linear_aggregation_is_the_same_in_both_modes(aggregator):
    """Linear aggregation commutes with the chain rule: representation and parameter mode agree,
    and with Sum both equal a plain summed backward (the trunk gets 0.3 g1 + 0.7 g2 under Constant)."""
    results = {}
    for mode in ("representation", "parameters"):
        model = TinyMTL(TWO)
        balancer = JacobianAggregation(TWO, aggregator=aggregator, mode=mode)
        report = step(model, balancer, TWO, seed=4)
        results[mode] = grads(model)
    for key, value in results["parameters"].items():
        torch.testing.assert_close(results["representation"][key], value, rtol=1e-5, atol=1e-7)

    model = TinyMTL(TWO)
    x, targets = batch(TWO, 4)
    _, losses = model.losses(x, targets, TWO)
    weights = aggregator.weighting.weights if isinstance(aggregator, Constant) else torch.ones(2)
    assert list(report.weights.values()) == pytest.approx(weights.tolist())
    trunk = list(model.trunk.parameters())
    shared = torch.autograd.grad(
        sum(w * loss for w, loss in zip(weights, losses.values(), strict=True)), trunk, retain_graph=True
    )
    torch.autograd.backward(sum(losses.values()), inputs=list(model.heads.parameters()))
    for (name, _), value in zip(model.trunk.named_parameters(), shared, strict=True):
        torch.testing.assert_close(results["parameters"][f"trunk.{name}"], value, rtol=1e-5, atol=1e-7)
    for key, value in grads(model).items():
        torch.testing.assert_close(results["parameters"][key], value, rtol=1e-5, atol=1e-7)


def test_extra_loss_is_added_unweighted():
    """A loss outside balancing (e.g. a router's) adds its own gradient, also at the features."""
    model, reference = TinyMTL(TWO), TinyMTL(TWO)
    x, targets = batch(TWO, 2)
    features, losses = model.losses(x, targets, TWO)
    extra = 0.5 * features.pow(2).mean()
    JacobianAggregation(TWO, aggregator=Sum()).backward(
        losses, shared_params=list(model.trunk.parameters()), shared_features=features, extra_loss=extra
    )
    features, losses = reference.losses(x, targets, TWO)
    (sum(losses.values()) + 0.5 * features.pow(2).mean()).backward()
    for key, value in grads(reference).items():
        torch.testing.assert_close(grads(model)[key], value, rtol=1e-5, atol=1e-7)


def test_update_every_reuses_weights_between_aggregations():
    model = TinyMTL(THREE)
    balancer = build_balancer("mgda", THREE, update_every=3)
    first = step(model, balancer, THREE, seed=0)
    # Steps 2 and 3 reuse step 1's weights as a plain weighted sum (on new batches).
    for seed in (1, 2):
        model.zero_grad()
        report = step(model, balancer, THREE, seed=seed)
        assert report.weights == first.weights
        reference = TinyMTL(THREE)
        reference.load_state_dict(model.state_dict())
        x, targets = batch(THREE, seed)
        _, losses = reference.losses(x, targets, THREE)
        trunk = list(reference.trunk.parameters())
        weighted = sum(first.weights[t] * losses[t] for t in THREE)
        for p, g in zip(trunk, torch.autograd.grad(weighted, trunk, retain_graph=True), strict=True):
            p.grad = g
        torch.autograd.backward(sum(losses.values()), inputs=list(reference.heads.parameters()))
        for key, value in grads(reference).items():
            torch.testing.assert_close(grads(model)[key], value, rtol=1e-5, atol=1e-7)
    assert step(model, balancer, THREE, seed=3).weights != first.weights  # step 4 aggregates again
    # A new combination of present tasks aggregates at once.
    subset = step(model, balancer, THREE[:2], seed=4)
    assert step(model, balancer, THREE[1:], seed=5).weights.keys() == {"open", "count"}
    assert int(balancer.steps_since_update) == 1 and subset.weights.keys() == {"binary", "open"}


def _linear_features(theta):
    """Features equal to the shared parameter theta (a non-leaf tensor, as a trunk would give)."""
    return theta * 1.0


def test_gradnorm_matches_hand_computed_update():
    theta = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = GradNorm(["a", "b"], alpha=1.5)

    # Step 1: L_a = 2 f0 = 2 (dL/df = (2, 0), G_a = 2); L_b = f1^2 = 4 (dL/df = (0, 4), G_b = 4).
    # w = (1, 1), L(0) = (2, 4), so r = (1, 1); mean(w G) = 3, target = (3, 3);
    # dL_grad/dw = sign(w G - target) * G = (sign(-1) 2, sign(1) 4) = (-2, 4).
    f = _linear_features(theta)
    report = balancer.backward({"a": 2 * f[0], "b": f[1] ** 2}, shared_params=[theta], shared_features=f)
    assert report.weights == {"a": 1.0, "b": 1.0}
    assert [balancer.weights[t].grad.item() for t in "ab"] == pytest.approx([-2.0, 4.0])
    assert theta.grad.tolist() == pytest.approx([2.0, 4.0])  # d(L_a + L_b)/dtheta

    # An optimiser step (SGD, lr 0.1) moves w to (1.2, 0.6); the next call renormalises to sum 2:
    # w = (1.2, 0.6) * 2 / 1.8 = (4/3, 2/3).
    with torch.no_grad():
        for task in "ab":
            balancer.weights[task] -= 0.1 * balancer.weights[task].grad
            balancer.weights[task].grad = None
    theta.grad = None
    with torch.no_grad():
        theta.copy_(torch.tensor([2.0, 1.0]))

    # Step 2: L_a = 4, G_a = 2; L_b = 1, G_b = 2 f1 = 2. L/L(0) = (2, 0.25), mean 1.125,
    # r = (16/9, 2/9); w G = (8/3, 4/3), mean 2; target = 2 r^1.5 = (4.7407, 0.2095);
    # sign(w G - target) = (-1, +1), so dL_grad/dw = (-2, +2).
    f = _linear_features(theta)
    report = balancer.backward({"a": 2 * f[0], "b": f[1] ** 2}, shared_params=[theta], shared_features=f)
    assert list(report.weights.values()) == pytest.approx([4 / 3, 2 / 3])
    assert [balancer.weights[t].grad.item() for t in "ab"] == pytest.approx([-2.0, 2.0])
    assert theta.grad.tolist() == pytest.approx([4 / 3 * 2, 2 / 3 * 2])  # w_a (2, 0) + w_b (0, 2 f1)


def test_db_mtl_matches_hand_computed_update():
    theta = nn.Parameter(torch.tensor([0.5, -0.5]))
    scale = nn.Parameter(torch.tensor(2.0))  # task a's own (head) parameter
    balancer = DBMTL(["a", "b", "c"], beta=0.5, eps=0.0)

    # Step 1 (c absent): log L_a = s f0 -> g_a = (2, 0); log L_b = 3 f1 -> g_b = (0, 3).
    # m = g + 0.5 (0 - g) = g / 2: m_a = (1, 0), m_b = (0, 1.5); norms (1, 1.5), max 1.5;
    # scales (1.5, 1); update = 1.5 (1, 0) + 1 (0, 1.5) = (1.5, 1.5). The head gets d(log L_a)/ds = f0.
    f = _linear_features(theta)
    losses = {"a": torch.exp(scale * f[0]), "b": torch.exp(3 * f[1])}
    report = balancer.backward(losses, shared_params=[theta], shared_features=f)
    assert list(report.weights.values()) == pytest.approx([1.5, 1.0])
    assert theta.grad.tolist() == pytest.approx([1.5, 1.5])
    assert scale.grad.item() == pytest.approx(0.5)

    # Step 2: log L_a = s f0 + f1 -> g_a = (2, 1); g_b = (0, 3).
    # m_a = (2, 1) + 0.5 ((1, 0) - (2, 1)) = (1.5, 0.5); m_b = (0, 3) + 0.5 ((0, 1.5) - (0, 3)) = (0, 2.25);
    # norms (sqrt(2.5), 2.25); scales (2.25 / sqrt(2.5), 1); update = scale_a (1.5, 0.5) + (0, 2.25).
    theta.grad = None
    f = _linear_features(theta)
    losses = {"a": torch.exp(scale * f[0] + f[1]), "b": torch.exp(3 * f[1])}
    report = balancer.backward(losses, shared_params=[theta], shared_features=f)
    scale_a = 2.25 / math.sqrt(2.5)
    assert list(report.weights.values()) == pytest.approx([scale_a, 1.0])
    assert theta.grad.tolist() == pytest.approx([scale_a * 1.5, scale_a * 0.5 + 2.25])

    # Step 3, b absent: a's and c's averages move, b's is kept.
    kept = balancer.grad_average.clone()
    f = _linear_features(theta)
    balancer.backward(
        {"a": torch.exp(scale * f[0]), "c": torch.exp(f[1])}, shared_params=[theta], shared_features=f
    )
    assert torch.equal(balancer.grad_average[1], kept[1])
    assert not torch.equal(balancer.grad_average[0], kept[0])
    assert balancer.grad_average[2].tolist() == pytest.approx([0.0, 0.5])  # (0, 1) / 2 at c's first step
    assert balancer.task_steps.tolist() == [3, 2, 1]


def test_absent_task_state_is_untouched():
    model = TinyMTL(THREE)
    uw, dwa, gradnorm, famo = (
        UncertaintyWeighting(THREE),
        DynamicWeightAverage(THREE),
        GradNorm(THREE),
        FAMO(THREE),
    )
    balancers = [uw, dwa, gradnorm, famo]
    optimizer = torch.optim.Adam(
        [{"params": model.parameters()}]
        + [{"params": b.parameters(), "lr": 0.1} for b in (uw, gradnorm, famo)]
    )
    for epoch in range(3):  # DWA: every task gets a two-epoch history
        for b in balancers:
            b.set_epoch(epoch)
        for seed in range(2):
            for b in balancers:
                optimizer.zero_grad()
                step(model, b, THREE, seed=seed)
                optimizer.step()
    count = THREE.index("count")
    for b in balancers:  # enter epoch 3 (DWA closes epoch 2) and settle GradNorm's last update
        b.set_epoch(3)
    gradnorm.renormalise()
    snapshot = {id(b): copy.deepcopy(b.state_dict()) for b in balancers}
    for epoch in (3, 4):  # two epochs without "count"
        for b in balancers:
            b.set_epoch(epoch)
        for seed in range(3):
            for b in balancers:
                optimizer.zero_grad()
                step(model, b, THREE[:2], seed=seed)
                assert all(p.grad is None for name, p in b.named_parameters() if name.endswith("count"))
                optimizer.step()

    def same(b, key, index=None):
        old, new = snapshot[id(b)][key], b.state_dict()[key]
        if index is not None:
            old, new = old[index], new[index]
        return torch.equal(old, new) or (old.isnan().all() and new.isnan().all())

    assert same(uw, "scalarizers.count.log_var") and not same(uw, "scalarizers.open.log_var")
    assert same(famo, "logits.count") and not same(famo, "logits.open")
    assert same(gradnorm, "weights.count") and not same(gradnorm, "weights.open")
    assert same(gradnorm, "initial_losses", count)
    assert same(dwa, "history", count) and same(dwa, "history_length", count)
    assert not same(dwa, "history", 0)
    assert dwa.epoch_steps[count] == 0 and dwa.epoch_steps[0] == 3
    # GradNorm's weights still sum to the number of tasks after renormalisation.
    gradnorm.renormalise()
    assert sum(w.item() for w in gradnorm.weights.values()) == pytest.approx(3.0, rel=1e-5)


def test_dwa_weights_follow_per_task_epoch_averages():
    dwa = DynamicWeightAverage(TWO, temperature=2.0)
    values = {0: (4.0, 2.0), 1: (2.0, 2.0)}  # epoch averages: binary 4 -> 2 (rate 0.5), open 2 -> 2 (rate 1)
    for epoch, (binary, open_) in values.items():
        dwa.set_epoch(epoch)
        for delta in (-1.0, 1.0):  # two steps averaging to the values above
            losses = {
                "binary": torch.tensor(binary + delta, requires_grad=True),
                "open": torch.tensor(open_ + delta, requires_grad=True),
            }
            assert dwa.backward(losses, shared_params=[]).weights == {"binary": 1.0, "open": 1.0}
    dwa.set_epoch(2)
    losses = {"binary": torch.tensor(1.0, requires_grad=True), "open": torch.tensor(1.0, requires_grad=True)}
    weights = dwa.backward(losses, shared_params=[]).weights
    # lambda = 2 softmax((0.5, 1) / 2) = 2 e^0.25 / (e^0.25 + e^0.5), 2 e^0.5 / (e^0.25 + e^0.5)
    denominator = math.exp(0.25) + math.exp(0.5)
    assert weights["binary"] == pytest.approx(2 * math.exp(0.25) / denominator)
    assert weights["open"] == pytest.approx(2 * math.exp(0.5) / denominator)


def test_uw_weights_and_log_variance_gradient():
    uw = UncertaintyWeighting(TWO)
    with torch.no_grad():
        uw.scalarizers["open"].log_var.fill_(math.log(4.0))
    losses = {"binary": torch.tensor(2.0, requires_grad=True), "open": torch.tensor(3.0, requires_grad=True)}
    report = uw.backward(losses, shared_params=[])
    # weight 0.5 exp(-s): 0.5 and 0.125; d/ds (0.5 e^-s L + 0.5 s) = 0.5 - 0.5 e^-s L: -0.5 and 0.5 - 0.375
    assert report.weights == pytest.approx({"binary": 0.5, "open": 0.125})
    assert uw.scalarizers["binary"].log_var.grad.item() == pytest.approx(-0.5)
    assert uw.scalarizers["open"].log_var.grad.item() == pytest.approx(0.125)
    assert losses["open"].grad.item() == pytest.approx(0.125)


def test_famo_logit_gradient_from_consecutive_losses():
    famo = FAMO(TWO, gamma=0.0, eps=0.0)
    first = famo.backward(
        {"binary": torch.tensor(2.0, requires_grad=True), "open": torch.tensor(4.0, requires_grad=True)},
        shared_params=[],
    )
    # z = (0.5, 0.5), c = 1 / (0.5/2 + 0.5/4) = 8/3; weights c z / L = (2/3, 1/3), summing to 1.
    assert first.weights == pytest.approx({"binary": 2 / 3, "open": 1 / 3})
    assert all(p.grad is None for p in famo.parameters())
    famo.backward(
        {"binary": torch.tensor(1.0, requires_grad=True), "open": torch.tensor(4.0, requires_grad=True)},
        shared_params=[],
    )
    # delta = log(prev) - log(now) = (log 2, 0); d(softmax(w) . delta)/dw at w = 0 is
    # z * (delta - z . delta) = 0.5 * (log 2 - log2 / 2, -log2 / 2) = (log2 / 4, -log2 / 4).
    assert famo.logits["binary"].grad.item() == pytest.approx(math.log(2) / 4)
    assert famo.logits["open"].grad.item() == pytest.approx(-math.log(2) / 4)


def test_gradvac_keeps_pairwise_state_per_task():
    model = TinyMTL(THREE)
    balancer = build_balancer("gradvac", THREE)
    step(model, balancer, THREE, seed=0)
    targets = balancer.gradvac_targets.clone()
    assert targets[0, 1] != 0 and targets[1, 2] != 0
    step(model, balancer, ["binary", "count"], seed=1)
    after = balancer.gradvac_targets
    assert after[0, 2] != targets[0, 2]  # the present pair moved
    assert torch.equal(after[:, 1], targets[:, 1]) and torch.equal(after[1], targets[1])  # "open" kept


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("uw", {}),
        ("dwa", {}),
        ("db_mtl", {}),
        *[(n, {"mode": m}) for n in ("upgrad", "nsgs", "gradnorm") for m in ("representation", "parameters")],
    ],
)
def test_bf16_autocast(name, options):
    model = TinyMTL(TWO)
    balancer = build_balancer(name, TWO, **options)
    x, targets = batch(TWO, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, losses = model.losses(x, targets, TWO)
        assert features.dtype == torch.bfloat16
        report = balancer.backward(
            losses, shared_params=list(model.trunk.parameters()), shared_features=features
        )
    assert all(math.isfinite(w) for w in report.weights.values())
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_options_and_inputs_are_checked():
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        build_balancer("nope", TWO)
    with pytest.raises(ValueError, match="takes no option"):
        build_balancer("uw", TWO, mode="parameters")
    with pytest.raises(ValueError, match="per-task option 'pref_vector'"):
        build_balancer("upgrad", TWO, pref_vector={"binary": 1.0})
    with pytest.raises(ValueError, match="mode must be"):
        build_balancer("pcgrad", TWO, mode="layers")
    with pytest.raises(ValueError, match="aggregator 'mgda'"):
        build_balancer("mgda", TWO, bogus=1)
    balancer = build_balancer("pcgrad", TWO)
    model = TinyMTL(TWO)
    x, targets = batch(TWO, 0)
    features, losses = model.losses(x, targets, TWO)
    with pytest.raises(ValueError, match="unknown tasks \\['typo'\\]"):
        balancer.backward({**losses, "typo": losses["open"]}, shared_params=[], shared_features=features)
    with pytest.raises(ValueError, match="needs shared_features"):
        balancer.backward(losses, shared_params=[])


def test_per_task_preference_is_sliced_to_present_tasks():
    balancer = build_balancer("upgrad", THREE, pref_vector={"binary": 1.0, "open": 2.0, "count": 4.0})
    model = TinyMTL(THREE)
    step(model, balancer, ["binary", "count"], seed=0)
    aggregator = balancer._aggregators[("binary", "count")]
    assert aggregator.pref_vector.tolist() == [1.0, 4.0]


def test_db_mtl_restarts_its_averages_when_the_shared_parameters_change():
    """A frozen warm-up ends: more shared parameters train, and the averages start again."""
    small = nn.Parameter(torch.tensor([0.5, -0.5]))
    extra = nn.Parameter(torch.tensor([1.0]))
    balancer = DBMTL(["a", "b"], beta=0.5, eps=0.0)
    f = _linear_features(small)
    balancer.backward({"a": torch.exp(f[0]), "b": torch.exp(f[1])}, shared_params=[small], shared_features=f)
    assert balancer.grad_average.shape == (2, 2) and balancer.task_steps.tolist() == [1, 1]
    f = _linear_features(small) * extra
    report = balancer.backward({"a": torch.exp(f[0]), "b": torch.exp(f[1])}, shared_params=[small, extra], shared_features=f)
    assert balancer.grad_average.shape == (2, 3) and balancer.task_steps.tolist() == [1, 1]
    assert all(math.isfinite(w) for w in report.weights.values())
