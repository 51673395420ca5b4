"""Paper names q, k, v, o on every model type of transformers' registry that has attention.

A tiny random model is built from each type's own config class (few layers, small widths and vocabulary).
For each of q, k, v, o, ``resolve`` must name exactly one projection per attention (self- and cross-), and
that projection must be the one the attention reads:

- q, k, v: a perturbation added to the projection's output at one position p reaches the attention call
  (transformers' attention interface, recorded by wrapping ``sdpa``) only in the query (resp. key, value)
  tensor, only at position p. Models that do not call the interface are checked through their attention
  probabilities (``output_attentions``): perturbing q at p changes only row p of that layer's probabilities,
  k changes other rows too, v and o change none.
- o: its input is the attention call's output (interface), or it reads the value mix linearly (a value
  perturbation doubled doubles the change of o's input; probabilities path).

q and v must also name the modules PEFT's default LoRA targets name
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), and the family table must agree with the
structure read from the module tree. The default run covers the claimed types, popular types and ViT-style
encoders (``DEFAULT_TYPES``); every other registry type runs under ``-m integration``.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES  # noqa: E402

from lowrank.adapters.base import layer_kind  # noqa: E402
from lowrank.targeting import FAMILIES, PAPER_NAMES, _family_matches, resolve, structure  # noqa: E402

CLAIMED = sorted({t for family in FAMILIES for t in family.model_types})
POPULAR = ("phi", "phi3", "falcon", "gptj", "gpt_neo", "bloom", "mpt", "stablelm", "gpt_bigcode", "qwen2_moe",
           "qwen3_moe", "gemma3", "llama4", "deepseek_v3", "glm", "vit", "swin", "clip", "roformer", "albert",
           "longformer", "modernbert", "mpnet", "deberta")
VISION = ("llama4_text", "deit", "siglip", "dinov2", "beit", "vit_mae", "swinv2", "clip_vision_model", "siglip_vision_model")
DEFAULT_TYPES = sorted(set(CLAIMED) | set(POPULAR) | set(VISION) | {"convnext"})

_NO_O = ('o is not found for every attention (hybrid or cross-modal blocks whose output projection has another '
    'name or shape)')
_NOT_BUILT = 'its config class alone builds no tiny model (sub-configs or fields this test does not set)'
_NO_ATTENTION = ("no q, k, v projections by name in the tiny model (convolutional, recurrent, state-space or "
                 "linear-attention layers, or projection names outside targeting's list)")
_O_NOT_LINEAR = ("o's input is neither the attention call's output nor linear in v (a norm or a differential attention "
    'before o): o is unverified')
_FORWARD = 'its forward fails at the tiny size'
_PROBABILITIES = ('outside the attention interface, and its attention probabilities are not one (query × key) map per q '
    'projection (windows, stages, spatial reduction, hashing)')
_KEYS_MIXED = ('the key at one position reaches other positions before the attention call (a short convolution over '
    'keys, or self- and cross-attention keys merged): the position check does not apply')
_GRID = 'projections act on a 2-D token grid: a one-position perturbation covers a whole column'

#: Types that are not checked, with the reason (the registry sweep's outcome on these tiny configs).
SKIPPED: dict[str, str] = {
    "convnext": "no attention: convolutions only (targets by layer kind)",
    "swinv2": "outside the attention interface, and its attention probabilities come per stage, not per block",
    **dict.fromkeys((
        'aria', 'bigbird_pegasus', 'convbert', 'gemma3n_audio', 'led',
    ), _NO_O),
    **dict.fromkeys((
        'autoformer', 'bridgetower', 'chameleon', 'cohere_compass', 'cohere_compass_text', 'conditional_detr',
        'csm', 'dab-detr', 'dbrx', 'deepseek_ocr2', 'deformable_detr', 'detr', 'diffusion_gemma', 'dinat',
        'donut-swin', 'dots1', 'dots3_note', 'dots3_note_text', 'edgetam', 'edgetam_vision_model',
        'embedding_gemma2', 'embedding_gemma2_text', 'emu3', 'ernie4_5_vl_moe', 'esm', 'evolla', 'fast_vlm',
        'funnel', 'gemma3n', 'gemma3n_text', 'gemma3n_vision', 'gemma4', 'gemma4_text', 'gemma4_unified',
        'gemma4_unified_text', 'granite4_vision', 'higgs_audio_v2_tokenizer', 'hunyuan_v1_dense',
        'hunyuan_v1_moe', 'hunyuan_vl', 'hunyuan_vl_text', 'informer', 'kyutai_speech_to_text', 'layoutlmv2',
        'lfm2_moe', 'maskformer-swin', 'mimi', 'mimi_decoder', 'ministral', 'moonshine_streaming', 'musicgen',
        'musicgen_melody', 'nemotron', 'neomme', 'omdet-turbo', 'pe_audio_video', 'pe_audio_video_encoder',
        'pe_video', 'pe_video_encoder', 'perception_lm', 'pocket_tts_audio_tokenizer',
        'pocket_tts_audio_tokenizer_decoder', 'pp_ocrv6_medium_det', 'prophetnet', 'reformer', 'swin2sr',
        't5gemma2_encoder', 'table-transformer', 'time_series_transformer', 'timm_backbone', 'timm_wrapper',
        'voxtral_realtime_text', 'wavtokenizer', 'xlnet',
    ), _NOT_BUILT),
    **dict.fromkeys((
        'axk2', 'bamba', 'bark', 'bit', 'convnextv2', 'cpmant', 'cvt', 'dac', 'deepseek_v4', 'dinov3_convnext',
        'efficientnet', 'encodec', 'falcon_mamba', 'fastspeech2_conformer',
        'fastspeech2_conformer_with_hifigan', 'fnet', 'focalnet', 'gemma4_audio', 'gemma4_vision',
        'glm_image_vqmodel', 'granitemoehybrid', 'hgnet_v2', 'ibert', 'inkling2_loop_text', 'inkling2_text',
        'jetmoe', 'levit', 'lfm3', 'lfm3_vl_vision', 'mamba', 'mamba2', 'mobilenet_v1', 'mobilenet_v2',
        'mobilevitv2', 'moshi', 'muse_spark_audio', 'patchtsmixer', 'poolformer', 'pp_ocrv5_mobile_rec',
        'pp_ocrv5_server_rec', 'pp_ocrv6_small_det', 'pp_ocrv6_small_rec', 'pp_ocrv6_tiny_rec',
        'qwen3_5_moe_text', 'qwen3_5_text', 'qwen3_next', 'qwen4_exp_text', 'recurrent_gemma', 'regnet',
        'resnet', 'rwkv', 'sam3_lite_text_text_model', 'squeezebert', 'swiftformer', 'textnet', 'univnet',
        'uvdoc', 'vibevoice_acoustic_tokenizer', 'vibevoice_acoustic_tokenizer_decoder',
        'vibevoice_acoustic_tokenizer_encoder', 'wav2vec2-bert', 'wav2vec2-conformer', 'wavtokenizer_encoder',
        'zaya',
    ), _NO_ATTENTION),
    **dict.fromkeys((
        'bitnet', 'diffllama', 'dory', 'hrm_text', 'muse_spark', 'muse_spark_text', 'olmo_hybrid',
    ), _O_NOT_LINEAR),
    **dict.fromkeys((
        'canine', 'vits',
    ), _FORWARD),
    **dict.fromkeys((
        'git', 'got_ocr2', 'inkling2', 'inkling2_loop', 'pvt', 'sam_hq_vision_model', 'sam_vision_model',
        'vilt', 'vitdet', 'yoso',
    ), _PROBABILITIES),
    **dict.fromkeys((
        'inkling_mm_model', 'inkling_text', 't5gemma2',
    ), _KEYS_MIXED),
    **dict.fromkeys((
        'sam3_vision_model', 'sam3_vit_model',
    ), _GRID),
}

#: Types whose q, v deliberately differ from PEFT's default targets, with the reason.
PEFT_DIFFERS: dict[str, str] = {
    "blip-2": "PEFT's defaults leave the Q-Former's query/value out; q, v name every attention's projections",
}

#: Config fields set on every (sub-)config that has them: a model of a few layers and tiny widths.
SMALL = dict(
    hidden_size=32, d_model=32, n_embd=32, n_embed=32, embed_dim=32, num_hidden_layers=2, num_layers=2, n_layer=2,
    n_layers=2, encoder_layers=1, decoder_layers=1, num_decoder_layers=1, num_attention_heads=4, n_head=4,
    num_heads=4, n_heads=4, encoder_attention_heads=4, decoder_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, ffn_dim=48, encoder_ffn_dim=48, decoder_ffn_dim=48, d_ff=48, n_inner=48, vocab_size=64,
    head_dim=8, d_kv=8, max_position_embeddings=64, image_size=32, patch_size=8, num_experts=4,
    num_local_experts=4, n_routed_experts=4, moe_intermediate_size=16, num_experts_per_tok=2,
    shared_expert_intermediate_size=16, ffn_hidden_size=48, pad_token_id=0, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1,
    attention_window=4, embedding_size=32, rotary_dim=4, projection_size=32, max_source_positions=8,
)
#: Per-type fields on top of ``SMALL`` (what a type needs to run at that size).
OVERRIDES: dict[str, dict] = {
    "deepseek_v3": {"head_dim": 4, "num_key_value_heads": 4},  # rotary head_dim is qk_rope_head_dim; MLA: kv = heads
    "swin": {"image_size": 32, "patch_size": 4, "window_size": 2, "depths": [2, 2], "num_heads": [2, 4]},
    "swinv2": {"image_size": 32, "patch_size": 4, "window_size": 2, "depths": [2, 2], "num_heads": [2, 4]},
    "xmod": {"default_language": "en_XX"},
}
POSITION, TOKENS = 2, 6


def shrink(config, depth: int = 0, own: bool = True):
    """Set ``SMALL``'s fields on ``config`` (unless ``own`` is False) and on its sub-configs."""
    for key, value in SMALL.items() if own else ():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            try:
                setattr(config, key, value)
            except AttributeError:  # a derived field (a property)
                pass
        elif key == "attention_window" and isinstance(current, list):
            setattr(config, key, [value] * len(current))
    for key in list(vars(config)):
        sub = getattr(config, key)
        if depth < 3 and hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            shrink(sub, depth + 1)
    return config


def build(model_type: str, attn: str):
    torch.manual_seed(0)
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    small = {k: v for k, v in SMALL.items() if isinstance(getattr(default, k, None), int)
             and not isinstance(getattr(default, k), bool)}
    try:  # through the constructor, so that derived fields (head_dim, qk_head_dim, ...) follow
        config = shrink(cls(**small), own=False)
    except Exception:
        config = shrink(default)
    for key, value in OVERRIDES.get(model_type, {}).items():
        setattr(config, key, value)
    return transformers.AutoModel.from_config(config, attn_implementation=attn).eval()


def inputs(model) -> list[dict]:
    """Forward arguments to try, in order: every input the model takes, then text only, then images only."""
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(1)
    vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None),
                                                                 "vocab_size", 64)
    text = {"input_ids": torch.randint(3, min(vocab, 64), (1, TOKENS), generator=g)}
    if "decoder_input_ids" in params:
        text["decoder_input_ids"] = torch.randint(3, min(vocab, 64), (1, TOKENS), generator=g)
    vision = getattr(model.config, "vision_config", None) or model.config
    image = {}
    if "pixel_values" in params and isinstance(getattr(vision, "image_size", None), int):
        channels = getattr(vision, "num_channels", 3)
        image = {"pixel_values": torch.randn(1, channels, vision.image_size, vision.image_size, generator=g,
                                             )}
    if "noise" in params and image:  # ViT-MAE's patch shuffle, fixed
        patches = (vision.image_size // vision.patch_size) ** 2
        image["noise"] = torch.rand(1, patches, generator=g)
    mels = next((getattr(c, "num_mel_bins") for c in (model.config, *vars(model.config).values())
                 if isinstance(getattr(c, "num_mel_bins", None), int)), None)
    if "input_features" in params and mels:  # speech encoders: (batch, mel bins, frames)
        frames = 2 * getattr(model.config, "max_source_positions", TOKENS)
        text.pop("input_ids")
        return [{"input_features": torch.randn(1, mels, frames, generator=g), **text}]
    options = [{**text, **image}] if "input_ids" in params else []
    options += [text] if "input_ids" in params else []
    options += [image] if image else []
    return options


class Recorder:
    """Wraps transformers' ``sdpa`` attention: every call's module, query, key, value and output."""

    def __init__(self, original):
        self.original, self.calls = original, []

    def __call__(self, module, query, key, value, *args, **kwargs):
        out, weights = self.original(module, query, key, value, *args, **kwargs)
        self.calls.append((module, query.detach().clone(), key.detach().clone(), value.detach().clone(),
                           out.detach().clone()))
        return out, weights


@pytest.fixture
def recorder(monkeypatch):
    from transformers.modeling_utils import AttentionInterface

    rec = Recorder(AttentionInterface._global_mapping["sdpa"])
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", rec)
    return rec


def perturb(module, rows, scale: float = 1.0, seed: int = 5):
    """A forward hook adding a fixed random vector to the output at position ``POSITION`` (``rows`` only)."""
    def hook(_, __, out):
        out = out.clone()
        width = out.shape[-1] if rows is None else len(rows)
        delta = torch.randn(width, generator=torch.Generator().manual_seed(seed), dtype=out.dtype) * scale
        index = torch.arange(out.shape[-1]) if rows is None else rows
        out[(*position_index(out), index)] += delta
        return out
    return module.register_forward_hook(hook)


def position_index(out: torch.Tensor) -> tuple:
    """Index of position ``POSITION`` in a projection's output: the last dimension before the features that
    is longer than 1 (batch is 1; Longformer's are (positions, batch, features), Swin's (windows, positions,
    features))."""
    dims = [d for d in range(out.dim() - 1) if out.shape[d] > 1]
    return tuple(POSITION if d == dims[-1] else slice(None) for d in range(out.dim() - 1))


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    diff = (a - b).abs().transpose(0, -2).reshape(a.shape[-2], -1).amax(1)
    return {int(i) for i in torch.nonzero(diff > 1e-5)}


def first_tensor(out):
    """The first tensor of a model output (its last hidden state or logits)."""
    if isinstance(out, torch.Tensor):
        return out
    for value in (out.values() if hasattr(out, "values") else out):
        if isinstance(value, (torch.Tensor, tuple, list, dict)) and (found := first_tensor(value)) is not None:
            return found
    return None


def run(model, args, **kw):
    with torch.no_grad():
        return model(**args, use_cache=False, **kw) if "use_cache" in inspect.signature(model.forward).parameters \
            else model(**args, **kw)


def forward_args(model):
    for args in inputs(model):
        try:
            run(model, args)
            return args
        except Exception:
            continue
    pytest.skip(f"{model.config.model_type}: mapping and PEFT's defaults checked; no forward on the inputs this "
                f"test builds")


def owner_call(calls, name: str, modules: dict):
    """The first attention call whose module is the projection's attention (an ancestor of it)."""
    ancestors = {id(modules[prefix]) for prefix in _prefixes(name)}
    return next((i for i, call in enumerate(calls) if id(call[0]) in ancestors), None)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def check_interface(model, rec, args, found) -> int:
    """q, k, v, o checked against the recorded attention calls; returns how many projections were checked."""
    modules = dict(model.named_modules())
    rec.calls.clear()
    run(model, args)
    base = list(rec.calls)
    checked, owners = 0, {t: {} for t in "qkv"}
    for t, slot in (("q", 1), ("k", 2), ("v", 3)):
        for target in found[t]:
            i = owner_call(base, target.name, modules)
            if i is None:
                continue  # its attention did not run on these inputs (e.g. a vision tower without images)
            rows = None if target.slices is None else target.slices[t]
            handle = perturb(target.module, rows)
            rec.calls.clear()
            try:
                run(model, args)
            finally:
                handle.remove()
            after = rec.calls[i]
            for other in (1, 2, 3):
                moved = changed_rows(after[other], base[i][other])
                if other == slot:
                    assert moved == {POSITION}, f"{t}={target.name}: its attention's {'qkv'[slot - 1]} moved at {moved}"
                else:
                    assert not moved, f"{t}={target.name} also moves the attention's {'qkv'[other - 1]}"
            owners[t].setdefault(i, []).append(target.name)
            checked += 1
    for t in "qkv":  # exactly one projection per attention that ran
        assert all(len(v) == 1 for v in owners[t].values()), f"{t}: several projections feed one attention: {owners[t]}"
        assert set(owners[t]) == set(owners["q"]), f"{t} feeds other attentions than q"
    outputs = [call[4] for call in base]
    for target in found["o"]:
        seen = []
        handle = target.module.register_forward_pre_hook(lambda _, a: seen.append(a[0].detach().clone()))
        try:
            run(model, args)
        finally:
            handle.remove()
        if not seen:
            continue
        x = seen[0]
        hits = [i for i, out in enumerate(outputs) if out.numel() == x.numel()
                and torch.allclose(out.reshape(x.shape), x, atol=1e-5)]
        if not hits:  # a gated or normalised attention output: o must still read the value mix linearly
            v = found["v"][index_for(target, {x.name: i for i, x in enumerate(found["v"])})]
            assert reads_value_mix(model, args, target, v), f"o={target.name}: its input is no attention output"
        checked += 1
    return checked


def check_probabilities(model, args, found) -> int:
    """q, k, v, o checked through each layer's attention probabilities (models outside the interface)."""
    out = run(model, args, output_attentions=True)
    probs = getattr(out, "attentions", None)
    if not probs:
        pytest.skip(f"{model.config.model_type}: neither the attention interface nor output_attentions")
    assert len(found["q"]) == len(probs), f"{len(found['q'])} q projections for {len(probs)} attention layers"
    index = {target.name: i for i, target in enumerate(found["q"])}
    layer_of = {t: [index_for(target, index) for target in found[t]] for t in "qkvo"}
    for t in "qkv":
        assert sorted(layer_of[t]) == list(range(len(probs))), f"{t}: not one projection per layer"
    result = first_tensor(out)
    o_of = dict(zip(layer_of["o"], found["o"]))
    for t in "qkvo":
        for layer, target in zip(layer_of[t], found[t]):
            rows = None if target.slices is None else target.slices[t]
            handle = perturb(target.module, rows)
            try:
                after = run(model, args, output_attentions=True)
            finally:
                handle.remove()
            moved = changed_rows(after.attentions[layer], probs[layer])
            if t == "q":
                assert moved == {POSITION}, f"q={target.name}: probabilities moved in rows {moved}"
            elif t == "k":
                assert moved - {POSITION}, f"k={target.name}: probabilities moved in rows {moved} only"
            else:
                assert not moved, f"{t}={target.name} moves the attention probabilities"
                assert changed_rows(first_tensor(after), result), f"{t}={target.name} changes nothing"
            if t == "v":
                o = o_of[layer]
                assert reads_value_mix(model, args, o, target), \
                    f"o={o.name} does not read v={target.name}'s mix linearly"
    return sum(len(found[t]) for t in "qkvo")


def reads_value_mix(model, args, o, v) -> bool:
    """o reads the attention's value mix (P·V, perhaps gated per element): twice a change of v's output
    changes o's input twice as much, and not by zero."""
    rows = None if v.slices is None else v.slices["v"]
    seen = []
    hook = o.module.register_forward_pre_hook(lambda _, a: seen.append(a[0].detach().clone()))
    try:
        run(model, args)
        for scale in (1.0, 2.0):
            handle = perturb(v.module, rows, scale)
            try:
                run(model, args)
            finally:
                handle.remove()
    finally:
        hook.remove()
    d1, d2 = seen[1] - seen[0], seen[2] - seen[0]
    return bool(d1.abs().max() > 1e-3 and torch.allclose(d2, 2 * d1, atol=1e-5))


def index_for(target, index):
    """The layer of a projection: the q projection sharing its closest ancestor."""
    best, depth = None, -1
    for name, i in index.items():
        common = 0
        for a, b in zip(name.split("."), target.name.split(".")):
            if a != b:
                break
            common += 1
        if common > depth:
            best, depth = i, common
    return best


def peft_modules(model, model_type: str) -> set[str] | None:
    spec = PEFT_TARGETS.get(model_type)
    if spec is None:
        return None
    names = set()
    for name, module in model.named_modules():
        if layer_kind(module) not in ("linear", "conv1d"):
            continue
        if isinstance(spec, str):
            hit = re.fullmatch(spec, name) is not None
        else:
            hit = any(name == key or name.endswith("." + key) for key in spec)
        if hit:
            names.add(name)
    return names


def check_type(model_type: str, recorder) -> None:
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    try:
        model = build(model_type, "sdpa")
    except Exception:
        model = build(model_type, "eager")
    found = {t: resolve(model, [t]) for t in "qkvo"}
    for t in "qkvo":  # one module per attention, and nothing adapted twice
        assert len({x.name for x in found[t]}) == len(found[t]) == len(found["q"]), f"{t}: {len(found[t])} modules"
    peft = peft_modules(model, model_type)
    if peft is not None and model_type not in PEFT_DIFFERS:
        ours = {x.name for t in "qv" for x in found[t]}
        everything = {x.name for t in PAPER_NAMES for x in _quiet(model, t)}
        assert ours <= peft <= everything, f"q, v: {sorted(ours)}; PEFT's defaults: {sorted(peft)}"
    args = forward_args(model)
    recorder.calls.clear()
    run(model, args)
    if recorder.calls:
        assert check_interface(model, recorder, args, found) > 0, "no projection's attention ran"
    else:
        eager = build(model_type, "eager")
        check_probabilities(eager, args, {t: resolve(eager, [t]) for t in "qkvo"})


def _quiet(model, target):
    try:
        return resolve(model, [target])
    except ValueError:
        return []


@pytest.mark.parametrize("model_type", DEFAULT_TYPES)
def test_q_k_v_o_feed_the_attention(model_type, recorder):
    check_type(model_type, recorder)


REGISTRY = sorted(t for t in CONFIG_MAPPING_NAMES if t in MODEL_MAPPING_NAMES and t not in DEFAULT_TYPES)


@pytest.mark.integration
@pytest.mark.parametrize("model_type", REGISTRY)
def test_q_k_v_o_on_every_registry_type(model_type, recorder):
    check_type(model_type, recorder)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_table_agrees_with_the_structure(family):
    """The family table overrides the structural reading; on its own types the two must name the same
    modules (and the same rows of a fused projection)."""
    for model_type in family.model_types:
        model = build(model_type, "eager")
        read = structure(model)
        for t in family.targets:
            table = _family_matches(model, family, t)
            by_structure = read.targets[t]
            assert set(table) == set(by_structure), f"{model_type} {t}: {sorted(table)} vs {sorted(by_structure)}"
            for name, rows in table.items():
                other = by_structure[name]
                assert (rows is None and other is None) or torch.equal(rows, other), f"{model_type} {t} {name}"


@pytest.mark.parametrize("model_type", ["phi3", "falcon", "gpt_bigcode", "deepseek_v3", "deberta"])
def test_lora_on_fused_slices_merges_to_its_forward(model_type):
    """LoRA on q, k, v, o of a fused or latent projection (unequal or interleaved slices): zero at
    initialisation, and merging the trained update gives the unmerged forward."""
    import lowrank

    model = build(model_type, "eager")
    args = forward_args(model)
    y0 = first_tensor(run(model, args))
    lowrank.adapt(model, "lora", targets=["q", "k", "v", "o"], rank=2)
    assert torch.allclose(first_tensor(run(model, args)), y0, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lowrank.trainable_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    y1 = first_tensor(run(model, args))
    assert (y1 - y0).abs().max() > 1e-4
    lowrank.merge_adapters(model)
    assert torch.allclose(first_tensor(run(model, args)), y1, atol=1e-5)


def test_moe_experts_refuse_ffn_names_in_one_line_and_attention_adapts():
    """transformers stores MoE experts as one 3-D parameter per matrix: up/gate/down are refused in one line
    naming it; q, k, v, o adapt as on a dense model."""
    import lowrank

    model = build("qwen2_moe", "eager")
    with pytest.raises(ValueError, match=r"target 'up': .*mlp\.experts stores its experts as one 3-D parameter"):
        resolve(model, ["up"])
    lowrank.adapt(model, "lora", targets=["q", "v"], rank=2)
    assert sorted(lowrank.adapted_modules(model)) == [f"layers.{i}.self_attn.{m}" for i in range(2)
                                                      for m in ("q_proj", "v_proj")]


def test_a_model_without_attention_names_its_modules_in_one_line():
    model = build("mamba", "eager")  # a state-space mixer: its fused in_proj is no q, k, v
    with pytest.raises(ValueError, match=r"target 'q': no q projection found in model_type 'mamba' .*in_proj") as e:
        resolve(model, ["q", "v"])
    assert "\n" not in str(e.value)
