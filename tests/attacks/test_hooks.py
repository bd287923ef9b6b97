"""The hook machinery: the probe catches a component that never fires."""

from __future__ import annotations

import pytest

from tests.tiny import make, tiny
from tgr_bench.attacks import hooks as hooks_module
from tgr_bench.errors import UserError


# ---- 4. the fired-count check and up-front errors ----------------------------------------------
def test_fused_attention_left_on_is_caught(monkeypatch: pytest.MonkeyPatch):
    model = tiny("vit")
    assert any(getattr(m, "fused_attn", False) for m in model.modules())  # timm's default
    monkeypatch.setattr(hooks_module, "set_fused_attn", lambda net, enabled: [])
    attack = make("tgr", "vit")
    with pytest.raises(UserError, match=r"\['attn'\] never fired"), attack.source_context(model):
        pytest.fail("the context must refuse to start")
