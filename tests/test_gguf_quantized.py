"""GGUF kept quantized (issue 13): Q4_0/Q4_1/Q8_0 blocks as GGMLKernel leaves, bit-exact to gguf's dequantization."""
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import jlora
from jlora.hf.gguf_quant import ggml_kernel, permute_fan_out
from jlora.hf.llama import load_gguf_llama, open_gguf, read_gguf_llama
from jlora.hf.shipped import smollm2_gguf_path
from jlora.qformats import GGMLKernel
from jlora.tree import flatten

TYPE_SIZE = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}


@pytest.fixture(scope="module")
def reader():
    return open_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def float_params(reader):
    return read_gguf_llama(reader, max_position_embeddings=128)[1]


@pytest.fixture(scope="module")
def quant_params(reader):
    return read_gguf_llama(reader, max_position_embeddings=128, quantized=True)[1]


def reference(data, qtype, shape):
    """gguf's own dequantization in the Flax (in, out) layout."""
    fan_in, fan_out = (int(s) for s in shape)
    return gguf.quants.dequantize(np.asarray(data), qtype).reshape(fan_out, fan_in).T


def assert_bit_exact(kernel: GGMLKernel, expected: np.ndarray) -> None:
    assert kernel.shape == expected.shape
    eager = np.asarray(kernel.dequantize())
    jitted = np.asarray(jax.jit(lambda k: k.dequantize())(kernel))
    for got in (eager, jitted):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(expected, np.float32).view(np.uint32))


SHIPPED = ["token_embd.weight"] + [f"blk.{b}.{k}.weight" for b in (0, 1) for k in (
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tensors_are_bit_exact(reader, name):
    tensor = next(t for t in reader.tensors if t.name == name)
    assert tensor.tensor_type == (T.Q8_0 if name.startswith("token_embd") else T.Q4_1)
    kernel = ggml_kernel(tensor.data, tensor.tensor_type, tensor.shape, name=name)
    assert kernel.kind == tensor.tensor_type.name.lower() and kernel.axis == -2
    assert_bit_exact(kernel, reference(tensor.data, tensor.tensor_type, tensor.shape))


def test_q4_0_quantized_by_gguf_is_bit_exact():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)  # torch rows (out, in): ggml shape [96, 48]
    data = gguf.quants.quantize(weight, T.Q4_0)
    assert data.dtype == np.uint8 and data.shape == (48, 3 * 18)
    kernel = ggml_kernel(data, T.Q4_0, (96, 48))
    assert kernel.codes.shape == (48, 48) and kernel.d.shape == (3, 48) and kernel.m is None
    assert_bit_exact(kernel, reference(data, T.Q4_0, (96, 48)))
    assert np.abs(np.asarray(kernel.dequantize()) - weight.T).max() < 0.5


def random_blocks(rng, qtype, fan_in, fan_out):
    """Random bytes with finite float16 d (and m): every code and scale bit pattern, subnormals included."""
    blocks = rng.integers(0, 256, (fan_out, fan_in // 32, TYPE_SIZE[qtype]), dtype=np.uint8)
    halves = 2 if qtype == T.Q4_1 else 1
    scales = blocks[:, :, :2 * halves].copy().view(np.uint16)
    scales[(scales & 0x7C00) == 0x7C00] &= 0xBFFF  # inf/NaN exponent -> a finite one
    blocks[:, :, :2 * halves] = scales.view(np.uint8)
    return blocks.reshape(fan_out, -1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_random_blocks_are_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    data = random_blocks(rng, qtype, 128, 40)
    kernel = ggml_kernel(data, qtype, (128, 40), name="random")
    assert kernel.codes.dtype == (np.int8 if qtype == T.Q8_0 else np.uint8)
    assert kernel.nbytes == data.size  # the file's bytes, rearranged
    assert_bit_exact(kernel, reference(data, qtype, (128, 40)))


def test_permute_fan_out_moves_whole_columns():
    data = random_blocks(np.random.default_rng(5), T.Q4_1, 64, 24)
    kernel = ggml_kernel(data, T.Q4_1, (64, 24))
    index = np.random.default_rng(6).permutation(24)
    moved = permute_fan_out(kernel, index)
    np.testing.assert_array_equal(np.asarray(moved.dequantize()), np.asarray(kernel.dequantize())[:, index])
    with pytest.raises(ValueError, match="24 column indices"):
        permute_fan_out(kernel, index[:3])


def test_read_quantized_matches_float(float_params, quant_params):
    floats, quants = flatten(float_params), flatten(quant_params)
    assert floats.keys() == quants.keys()
    quantized = [path for path, leaf in quants.items() if isinstance(leaf, GGMLKernel)]
    assert len(quantized) == 210 and all(p[:2] == ("model", "layers") and p[-1] == "kernel" for p in quantized)
    for path, leaf in quants.items():
        if path in quantized:
            assert leaf.kind == "q4_1"
            # q/k: the rotary un-permutation applied to the blocks equals the float path's
            np.testing.assert_array_equal(np.asarray(leaf.dequantize()).view(np.uint32), floats[path].view(np.uint32))
        else:  # norms and the (tied) embedding: float32, as without quantized
            assert leaf.dtype == np.float32
            np.testing.assert_array_equal(leaf, floats[path])


def test_logits_match_float(reader, float_params):
    # 128: transformers' FlaxLlama sincos table is cut to max_positions wide, broken below 2 * head_dim
    model, params = load_gguf_llama(reader, max_position_embeddings=128, quantized=True)
    floats = float_params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 8)))

    @jax.jit
    def logits(p):
        return model(ids, params=p).logits

    expected = np.asarray(logits(floats))
    with jlora.quantized_layers():  # traced inside: the interceptor is installed while jit traces
        got = np.asarray(jax.jit(lambda p: model(ids, params=p).logits)(params))
    assert np.isfinite(expected).all() and expected.shape == (2, 8, model.config.vocab_size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # same math: bit-identical on CPU


def test_base_bytes(float_params, quant_params):
    quants = flatten(quant_params)
    kernels = [path for path, leaf in quants.items() if isinstance(leaf, GGMLKernel)]
    floats = flatten(float_params)
    q_bytes = jlora.base_bytes([quants[p] for p in kernels])
    f_bytes = jlora.base_bytes([floats[p] for p in kernels])
    ratio = q_bytes / f_bytes
    print(f"projection kernels: {q_bytes} B quantized vs {f_bytes} B float32 (ratio {ratio:.4f}); whole model "
          f"{jlora.base_bytes(quant_params)} vs {jlora.base_bytes(float_params)} B")
    assert ratio == pytest.approx(20 / 128)  # Q4_1: 20 bytes per block of 32 float32s
    assert ratio < 0.25


def test_unsupported_block_type_is_named():
    data = np.zeros((8, 2 * 210), np.uint8)
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_down\.weight.*Q6_K.*Q4_0, Q4_1, Q8_0"):
        ggml_kernel(data, T.Q6_K, (512, 8), name="blk.3.ffn_down.weight")
    with pytest.raises(ValueError, match="not the Q4_1 bytes"):
        ggml_kernel(np.zeros((8, 19), np.uint8), T.Q4_1, (32, 8), name="short")
