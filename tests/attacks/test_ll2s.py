"""LL2S against the reference port of the official loop (tests/attacks/official/ll2s.py, fed our
per-image draws): each operation, the REINFORCE update, whole attacks; batch invariance, no host
syncs, the robust-token file and refused settings."""

from __future__ import annotations

import pytest
import torch

from tests.attacks import official
from tests.attacks.official import ll2s as port
from tests.attacks.support import assert_batch_invariant
from tests.attacks.test_host_sync import forbid_host_sync
from tests.tiny import batch, make, tiny
from tgr_bench.attacks.ll2s import (
    MOE,
    REST,
    SHUFFLE,
    SPARSE,
    _Plan,
    attn_draws,
    moe_draws,
    moe_experts,
    ops_draw,
    reinforce_step,
    robust_init,
    sample_ops,
)
from tgr_bench.errors import UserError

assert official  # the port's package

SMALL = {"num_scale": 3, "num_robust_tokens": 5, "shuffle_ratio": 1.0}
PORT_KEYS = (
    "num_scale",
    "ops_num",
    "ops_lr",
    "rest_p",
    "sparse_p",
    "shuffle_prob",
    "shuffle_ratio",
    "moe_n",
    "moe_p",
    "num_robust_tokens",
    "robust_lr",
    "robust_init_scale",
    "robust_tokens",
)


class PortDraws:
    """The port's `draws(kind, step, shape, device)` answering with one image's draws of ours:
    the forward and the block come from wrappers of the port's replaced forwards."""

    def __init__(self, key: int, attack) -> None:
        self.key, self.s = key, attack.s
        self.step, self.table, self.forward, self.layer = -1, 0, -1, 0
        self.heads = self.tokens = self.masks = 0

    def enter(self, layer: int, heads: int, tokens: int) -> None:
        if layer == 0:  # each forward replaces exactly one module of every block
            self.forward += 1
        self.layer, self.heads, self.tokens, self.masks = layer, heads, tokens, 0

    def __call__(self, kind, step, shape, device):
        s, k, f, lay = self.s, self.key, self.forward, self.layer
        if kind == "robust_init":
            return robust_init(k, shape[1], shape[2], device).unsqueeze(0)
        if kind == "ops":
            if step != self.step:
                self.step, self.table, self.forward = step, 0, -1
            self.table += 1
            return ops_draw(k, step, s.num_scale, shape[0], shape[1], device)[self.table - 1]
        if kind == "moe_n":
            n = moe_experts(k, step, f, lay, s.moe_n)
            return torch.tensor([(n - 1.5) / (s.moe_n - 1)])
        if kind == "moe_mask":
            n = moe_experts(k, step, f, lay, s.moe_n)
            self.masks += 1
            return moe_draws(k, step, f, lay, n, tuple(shape[1:]), device)[self.masks - 1][None]
        d = attn_draws(k, step, f, lay, self.heads, self.tokens, device)
        pick = {
            "rest_scores": d.rest,
            "sparse": d.sparse[None],
            "shuffle_coin": d.coin,
            "shuffle_perm": d.perm,
        }
        return pick[kind]


@pytest.fixture
def wrapped(monkeypatch):
    """Installs wrappers that tell a PortDraws which block of which forward runs."""

    def install(draws: PortDraws, net) -> None:
        attn = {id(b.attn): i for i, b in enumerate(net.blocks)}
        mlp = {id(b.mlp): i for i, b in enumerate(net.blocks)}
        a_op, m_op = port._attention_op, port._moe_op

        def attention(mod, op, state, x, *a, **k):
            draws.enter(attn[id(mod)], mod.num_heads, x.shape[1])
            return a_op(mod, op, state, x, *a, **k)

        def moe(mod, state, x, *a, **k):
            draws.enter(mlp[id(mod)], 0, x.shape[1])
            return m_op(mod, state, x, *a, **k)

        monkeypatch.setattr(port, "_attention_op", attention)
        monkeypatch.setattr(port, "_moe_op", moe)

    return install


def _port_constants(attack) -> dict:
    return {k: getattr(attack.s, k) for k in PORT_KEYS}


def _double(model):
    return model.double()


# ---- the operations ------------------------------------------------------------------------------
def test_each_operation_of_a_block_matches_the_official_one_per_image():
    model = _double(tiny("vit"))
    attack = make("ll2s", "vit", robust_tokens="none", shuffle_ratio=1.0, shuffle_prob=1.0)
    block = model.net.blocks[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 17, 48, generator=g, dtype=torch.float64)
    keys = [11, 12, 13, 14]
    ops = torch.tensor([[SPARSE, MOE], [SHUFFLE, REST], [REST, SPARSE], [MOE, SHUFFLE]])
    c = {**port.DEFAULTS, **_port_constants(attack)}
    with attack.source_context(model):
        attack._has_store = torch.zeros(4, dtype=torch.bool)
        attack._plan = _Plan(ops, keys, 1, 2)
        ours_attn, ours_mlp = block.attn(x), block.mlp(x)
        store = [t.clone() for t in attack._store]
        again = block.attn(x)  # image 2 now has its clean tokens: injection
        attack._plan = None
    for b, key_ in enumerate(keys):
        draws = PortDraws(key_, attack)
        draws.step, draws.forward = 1, 2
        draws.enter(0, 3, 17)
        draws.forward = 2
        state = port._State(draws=draws, c=c, step=1)
        op = int(ops[b, 0])
        if op == MOE:
            want = block.attn.__class__.forward(block.attn, x[b : b + 1])
            want_mlp = port._moe_op(block.mlp, state, x[b : b + 1])
            torch.testing.assert_close(ours_mlp[b : b + 1], want_mlp, rtol=0, atol=1e-12)
        else:
            want = port._attention_op(block.attn, op, state, x[b : b + 1])
            torch.testing.assert_close(
                ours_mlp[b : b + 1],
                block.mlp.__class__.forward(block.mlp, x[b : b + 1]),
                rtol=0,
                atol=1e-12,
            )
        torch.testing.assert_close(ours_attn[b : b + 1], want, rtol=0, atol=1e-12)
        if op == REST:  # captured: plain attention now, the store for the next REST block
            for t, w in zip(store, state.rest, strict=True):
                torch.testing.assert_close(t[b : b + 1], w, rtol=0, atol=1e-12)
            injected = port._attention_op(block.attn, REST, state, x[b : b + 1])
            torch.testing.assert_close(again[b : b + 1], injected, rtol=0, atol=1e-12)
            assert not torch.allclose(injected, want)
    assert torch.equal(store[0][0], torch.zeros_like(store[0][0]))  # image 0 stored nothing


def test_operation_definitions_on_their_own():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 3, 5, 5, generator=g).softmax(-1)
    keep = torch.rand(attn.shape, generator=g) > 0.4
    sparse = port.official_sparsify(attn, keep)
    assert torch.equal(sparse, torch.where(keep, attn, 0.0))  # post-softmax, no renormalization
    heads = torch.tensor([2, 0])
    shuffled = port.official_head_shuffle(attn, heads)
    assert torch.equal(shuffled[:, 2], attn[:, 0]) and torch.equal(shuffled[:, 0], attn[:, 2])
    from tgr_bench.attacks.ll2s import ghost_moe_factor, shuffle_source

    perm = torch.tensor([[0.9, 0.1, 0.5]])
    src = shuffle_source(torch.zeros(1, 1), perm, torch.tensor([True]), 0.5, 1.0)
    idx = perm.argsort(1)[0]
    want = port.official_head_shuffle(attn[:1], idx)
    assert torch.equal(attn[:1].gather(1, src.view(1, 3, 1, 1).expand(1, 3, 5, 5)), want)
    off = shuffle_source(torch.ones(1, 1), perm, torch.tensor([True]), 0.5, 1.0)  # coin >= prob
    assert off.tolist() == [[0, 1, 2]]
    keeps = [torch.rand(4, 6, generator=g) > 0.3 for _ in range(3)]
    assert torch.equal(ghost_moe_factor(keeps), torch.stack(keeps).float().mean(0))


# ---- the op distribution -------------------------------------------------------------------------
def test_sampling_and_the_reinforce_update_match_the_official_per_image():
    g = torch.Generator().manual_seed(2)
    aug = torch.randn(2, 4, 4, generator=g)
    u = torch.rand(2, 3, 4, 2, generator=g)
    ops = sample_ops(aug, u)
    for b in range(2):
        for s in range(3):
            want = port.official_sample_ops(aug[b], u[b, s])  # (L, J)
            assert torch.equal(ops[b, 2 * s : 2 * s + 2], want.T)
    rewards = torch.rand(2, 3, generator=g) * 5
    new = reinforce_step(aug, ops[:, :3], rewards, 0.01, 3)
    for b in range(2):
        want = port.official_reinforce_update(aug[b], ops[b, :3], rewards[b], 0.01, divisor=3)
        torch.testing.assert_close(new[b], want, rtol=1e-6, atol=1e-9)
    # The gradient itself (from zeros, lr 1 the update is the gradient) against the closed form.
    zero = torch.zeros(2, 4, 4)
    grad = reinforce_step(zero, ops[:, :3], rewards, 1.0, 3)
    for b in range(2):
        closed = port.official_reinforce_closed_form(zero[b], ops[b, :3], rewards[b], 3)
        torch.testing.assert_close(grad[b].double(), closed, rtol=1e-5, atol=0)
    assert (grad != 0).all()


# ---- whole attacks -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys",
    [
        {**SMALL},
        {**SMALL, "robust_tokens": "none", "steps": 3},
        # The official 20 forwards per step (num_scale 10, ops_num 2), fewer tokens for time.
        {"num_robust_tokens": 40, "steps": 2},
    ],
    ids=["dynamic", "none", "official_counts"],
)
def test_whole_attack_matches_the_official_loop_at_batch_1(wrapped, keys):
    model = _double(tiny("vit"))
    steps = keys.pop("steps", 2)
    attack = make("ll2s", "vit", steps=steps, **keys)
    x, y = batch(1)
    x = x.double()
    with attack.source_context(model):
        ours = attack.perturb(model, x, y, [7])
        aug = attack._aug.clone()
    draws = PortDraws(7, attack)
    wrapped(draws, model.net)
    trace: dict = {}
    want = port.official_attack(
        model, x, y, draws, steps=steps, trace=trace, **_port_constants(attack)
    )
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(aug[0], trace["aug_param"][-1], rtol=1e-5, atol=1e-9)
    assert (trace["configs"][0] == REST).any()  # the clean-token path is exercised
    assert not torch.equal(ours, x)


def test_global_tokens_from_a_file_match_the_official_loop(wrapped, tmp_path):
    tokens = torch.randn(6, 48, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "tokens.pt"
    torch.save(tokens, path)
    model = _double(tiny("vit"))
    attack = make(
        "ll2s",
        "vit",
        steps=2,
        robust_tokens="global",
        robust_tokens_file=str(path),
        **{k: v for k, v in SMALL.items() if k != "num_robust_tokens"},
    )
    assert len(attack.params()["robust_tokens_sha256"]) == 16
    x, y = batch(1)
    x = x.double()
    with attack.source_context(model):
        ours = attack.perturb(model, x, y, [3])
    draws = PortDraws(3, attack)
    wrapped(draws, model.net)
    c = {**_port_constants(attack), "global_tokens": tokens.double()}
    want = port.official_attack(model, x, y, draws, steps=2, **c)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-9)


def test_batch_1_and_batch_3_give_identical_pngs():
    attack = make("ll2s", "vit", steps=2, **{**SMALL, "num_scale": 2})
    assert_batch_invariant(attack, tiny("vit"))


def test_the_loop_never_syncs_the_host():
    model = tiny("vit")
    attack = make("ll2s", "vit", steps=2, **{**SMALL, "num_scale": 1})
    x, y = batch(2)
    with attack.source_context(model), forbid_host_sync() as calls:
        attack.perturb(model, x, y, [1, 2])
    assert calls == []


# ---- refusals ------------------------------------------------------------------------------------
def test_robust_tokens_file_is_checked(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make("ll2s", "vit", robust_tokens="global", robust_tokens_file=str(tmp_path / "no.pt"))
    with pytest.raises(UserError, match="robust_tokens=global"):
        make("ll2s", "vit", robust_tokens="global")
    torch.save(torch.zeros(3), tmp_path / "flat.pt")
    with pytest.raises(UserError, match=r"\(tokens, embed_dim\)"):
        make("ll2s", "vit", robust_tokens="global", robust_tokens_file=str(tmp_path / "flat.pt"))
    (tmp_path / "junk.pt").write_text("not a tensor")
    with pytest.raises(UserError, match="not a torch tensor file"):
        make("ll2s", "vit", robust_tokens="global", robust_tokens_file=str(tmp_path / "junk.pt"))
    torch.save(torch.zeros(4, 768), tmp_path / "wide.pt")
    wide = make("ll2s", "vit", robust_tokens="global", robust_tokens_file=str(tmp_path / "wide.pt"))
    with pytest.raises(UserError, match=r"needs \(tokens, 48\)"), wide.source_context(tiny("vit")):
        pass
    with pytest.raises(UserError, match="robust_tokens_file is set exactly"):
        make("ll2s", "vit", robust_tokens_file=str(tmp_path / "wide.pt"))


@pytest.mark.parametrize(
    "family,keys,match",
    [
        ("pit", {}, "only ViT/DeiT"),
        ("resnet", {}, "only ViT/DeiT"),
        (None, {}, "only ViT/DeiT"),
        ("vit", {"di": {"enabled": True}}, "takes no input modifier"),
        ("vit", {"rest_p": 1.5}, "rest_p"),
        ("vit", {"moe_n": 1}, "moe_n"),
        ("vit", {"robust_tokens": "learned"}, "robust_tokens"),
    ],
)
def test_bad_settings_are_refused(family, keys, match):
    with pytest.raises(UserError, match=match):
        make("ll2s", family, **keys)


def test_the_probe_refuses_a_source_whose_blocks_escape_the_patches(monkeypatch):
    model = tiny("vit")
    net = model.net
    attack = make("ll2s", "vit")
    original = type(net).forward_features

    def first_block_only(x, *a, **k):
        x = net.norm_pre(net._pos_embed(net.patch_embed(x)))
        return net.norm(net.blocks[0](x))

    monkeypatch.setattr(net, "forward_features", first_block_only, raising=False)
    with (
        pytest.raises(UserError, match="never ran during the probe"),
        attack.source_context(model),
    ):
        pass
    assert original is type(net).forward_features
