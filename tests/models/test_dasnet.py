"""DAS-Net and its ablation variants: sizes against the paper, dynamic conv, gates, deep supervision, export."""

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import aerialseg.models.dasnet as dasnet
from aerialseg.models import count_parameters, create_model, get_spec
from aerialseg.models.dasnet import PAPER_PARAMS, VARIANTS, DyConvBlock



@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_match_paper(name: str) -> None:
    params = count_parameters(create_model(name, classes=1))  # the paper's binary UAV masks
    assert params == pytest.approx(PAPER_PARAMS[name], rel=0.05)
    assert params == pytest.approx(PAPER_PARAMS[name], abs=0.005e6)  # equal at the table's 2 decimals


def test_dyconv_mixes_two_kernels_per_sample() -> None:
    torch.manual_seed(0)
    block = DyConvBlock(8, 16, kernels=2, temperature=1.0).eval()
    assert block.weight.shape == (2, 16, 8, 3, 3)
    x = torch.randn(3, 8, 12, 12)
    attn = block.mixing_weights(x)
    assert attn.shape == (3, 2) and torch.allclose(attn.sum(1), torch.ones(3))
    assert not torch.allclose(attn[0], attn[1])  # input-dependent
    with torch.no_grad():
        kernel_path = block._mix_kernels(x, attn)
        output_path = block._mix_outputs(x, attn)
        per_sample = torch.cat([torch.nn.functional.conv2d(x[i:i + 1], torch.einsum("k,koihw->oihw", attn[i],
                                                                                     block.weight), padding=1)
                                for i in range(3)])
    torch.testing.assert_close(kernel_path, per_sample, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output_path, per_sample, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # samples do not leak into each other through the grouped conv
        y1 = block(x)
        x2 = x.clone()
        x2[1:] = torch.randn(2, 8, 12, 12)
        torch.testing.assert_close(block(x2)[0], y1[0])


@pytest.mark.parametrize("name,aux", [("dasnet", 3), ("deepsup_dyunet", 3), ("full_dyunet", 0),
                                      ("thin_dyunet", 0)])
def test_deep_supervision_only_in_train_mode(name: str, aux: int) -> None:
    model = create_model(name, classes=5)
    x = torch.randn(2, 3, 128, 128)
    out = model.train()(x)
    if aux:
        logits, aux_logits = out
        assert len(aux_logits) == aux and all(a.shape == (2, 5, 128, 128) for a in aux_logits)
        assert get_spec(name).aux_weight == 0.4
    else:
        logits = out
        assert get_spec(name).aux_weight == 0.0
    assert logits.shape == (2, 5, 128, 128)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5, 128, 128)  # eval: logits only
    assert get_spec(name).pad_multiple == 128


def test_variant_structure() -> None:
    das = create_model("dasnet")
    assert len(das.gates) == 7 and len(das.encoder) == 8 and len(das.aux_heads) == 3
    assert all(isinstance(b, DyConvBlock) for b in [*das.encoder, *das.decoder])  # symmetric
    thin = create_model("thin_dyunet")
    assert thin.gates is None and thin.aux_heads is None
    assert all(isinstance(b, DyConvBlock) for b in thin.encoder)
    assert not any(isinstance(m, DyConvBlock) for m in thin.decoder.modules())


def test_gates_scale_skips_into_unit_interval() -> None:
    gate = create_model("dasnet").gates[0]
    g, skip = torch.randn(1, 64, 8, 8), torch.rand(1, 64, 8, 8) + 1.0
    out = gate(g, skip)
    ratio = out / skip
    assert torch.all(ratio >= 0) and torch.all(ratio <= 1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one attention map for all channels


def test_training_with_aux_loss_reduces_loss() -> None:
    torch.manual_seed(0)
    model = create_model("dasnet", classes=2).train()
    images = torch.zeros(2, 3, 128, 128)
    target = torch.zeros(2, 128, 128, dtype=torch.long)
    target[:, 32:96, 40:100] = 1
    images[:, :, 32:96, 40:100] = 2.0
    images += 0.2 * torch.randn_like(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    weight = get_spec("dasnet").aux_weight
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        logits, aux = model(images)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss = loss + weight * sum(torch.nn.functional.cross_entropy(a, target) for a in aux)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_onnx_export_has_no_aux_heads() -> None:
    model = create_model("dasnet", classes=5).eval()
    x = torch.randn(1, 3, 128, 128)
    calls = []
    original = dasnet._exporting

    def spy() -> bool:
        calls.append(original())
        return calls[-1]

    dasnet._exporting = spy
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    finally:
        dasnet._exporting = original
    assert calls and all(calls)  # the batch-free path ran while exporting
    buffer = io.BytesIO()
    onnx.save(program.model_proto, buffer)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert len(graph.output) == 1
    assert not [i.name for i in graph.initializer if "aux" in i.name]
    session = ort.InferenceSession(buffer.getvalue())
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_save_and_load_roundtrip(tmp_path) -> None:
    from aerialseg.models import load_model, save_model

    model = create_model("thin_dyunet", classes=5).eval()
    save_model(model, tmp_path / "run", "thin_dyunet", classes=5)
    loaded, meta = load_model(tmp_path / "run")
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert meta["preprocessing"]["aux_weight"] == 0.0
