"""visurf_ray.models: tokenizer; tiny Qwen2.5-VL build -> save -> load -> forward/backward -> generate; log-probs."""

import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

from visurf_ray.models import (
    ANSWER_SKELETON_TOKENS,
    ImageOnlyQwenVLProcessor,
    TinyVLMSpec,
    build_tiny_vlm,
    completion_logprobs,
    completion_logprobs_and_entropy,
    encode_prompts,
    encode_sequences,
    generate,
    load_policy,
    suppressed_token_ids,
    train_tokenizer,
)
from visurf_ray.models.inputs import (
    completion_logits,
    encode_completions,
    prompt_states,
    shared_prompt_logprobs_and_entropy,
)
from visurf_ray.models.policy import use_input_dtype_norms
from visurf_ray.models.vision_attention import BatchedWindowVisionAttention

CORPUS = [
    "Locate the red square in the image. Output its bbox and a point inside it in JSON.",
    "Locate the blue circle in the image. Output its bbox and a point inside it in JSON.",
    "Locate every green triangle in the image. Output their bboxes and points in JSON.",
    '<think>The red square is near the top left corner.</think> <answer>[{"bbox_2d": [14, 28, 42, 56], '
    '"point_2d": [28, 42]}]</answer>',
    '<think>There are two green triangles on the right.</think> <answer>[{"bbox_2d": [70, 14, 98, 42], '
    '"point_2d": [84, 28]}, {"bbox_2d": [70, 56, 98, 84], "point_2d": [84, 70]}]</answer>',
    "<think>No blue circle is in the image.</think> <answer>[]</answer>",
]
# Small enough for a fast float64 forward; still Qwen2.5-VL's own classes and an image of 16 image tokens.
SMALL = TinyVLMSpec(
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    text_mlp=128,
    vision_depth=1,
    vision_hidden=32,
    vision_heads=2,
    vision_mlp=64,
)


def shapes_image(colour: str, box: tuple[int, int, int, int], size: tuple[int, int] = (112, 112)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


IMAGES = [shapes_image("red", (14, 28, 42, 56)), shapes_image("blue", (56, 56, 98, 98), size=(140, 112))]
QUESTIONS = [CORPUS[0], "Where is the blue circle?"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vlm")
    build_tiny_vlm(CORPUS, SMALL, seed=0, out_dir=folder)
    return folder


@pytest.fixture
def policy(tiny_folder):
    return load_policy(tiny_folder)


# --- tokenizer -------------------------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic():
    first, second = train_tokenizer(CORPUS), train_tokenizer(CORPUS)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert train_tokenizer(CORPUS[:3]).backend_tokenizer.to_str() != first.backend_tokenizer.to_str()


def test_tokenizer_splits_digits_and_keeps_skeleton_tokens_whole():
    tokenizer = train_tokenizer(CORPUS)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("1024 7")) == ["1", "0", "2", "4", "Ġ", "7"]
    for token in ANSWER_SKELETON_TOKENS:
        assert len(tokenizer.encode(token)) == 1, token
    answer = CORPUS[3]
    ids = tokenizer.encode(answer)
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer
    assert tokenizer.decode(ids[:2]) == "<think>The"


def test_tokenizer_special_tokens_and_chat_template():
    tokenizer = train_tokenizer(CORPUS)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    for token in ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        assert len(tokenizer.encode(token)) == 1
        assert tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids(token)].special
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is it?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match=r"corpus\[1\]"):
        train_tokenizer(["fine", 3])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)


# --- build, save, load -----------------------------------------------------------------------------------------------


def test_build_is_deterministic_for_a_seed():
    first, second, other = (build_tiny_vlm(CORPUS, SMALL, seed=seed) for seed in (3, 3, 4))
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert first.tokenizer.backend_tokenizer.to_str() == second.tokenizer.backend_tokenizer.to_str()
    embed = "model.language_model.embed_tokens.weight"
    assert not torch.equal(first.model.state_dict()[embed], other.model.state_dict()[embed])


def test_default_spec_matches_the_measured_tiny_model():
    spec = TinyVLMSpec()
    assert (spec.head_dim, spec.image_tokens, spec.mrope_section()) == (64, 16, [0, 16, 16])
    policy = build_tiny_vlm(CORPUS, spec)
    config = policy.model.config
    assert type(policy.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert config.tie_word_embeddings and policy.model.lm_head.weight is policy.model.get_input_embeddings().weight
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (128, 4)
    assert (config.vision_config.depth, config.vision_config.hidden_size) == (2, 96)
    assert 1.0e6 < sum(parameter.numel() for parameter in policy.model.parameters()) < 2.0e6
    with pytest.raises(ValueError, match="head_dim"):
        TinyVLMSpec(text_hidden=96, text_heads=4)


def test_default_spec_has_vllms_head_dim_and_runs():
    spec = TinyVLMSpec()
    policy = build_tiny_vlm(CORPUS, spec)
    attention = policy.model.model.language_model.layers[0].self_attn
    assert spec.head_dim == attention.head_dim == 64 and spec.mrope_section() == [0, 16, 16]
    batch = encode_sequences(policy, encode_prompts(policy, IMAGES, QUESTIONS), [[40, 41], [42]], [0, 1])
    logp, _ = completion_logprobs(policy.model, batch)
    assert torch.isfinite(logp).all()


def test_save_and_load_round_trip(tiny_folder, policy):
    built = build_tiny_vlm(CORPUS, SMALL, seed=0)
    assert isinstance(policy.processor, ImageOnlyQwenVLProcessor)
    assert policy.model.dtype == torch.float32 and policy.device.type == "cpu"
    for name, tensor in built.model.state_dict().items():
        assert torch.equal(tensor, policy.model.state_dict()[name]), name
    assert policy.model.lm_head.weight is policy.model.get_input_embeddings().weight
    loaded, fresh = encode_prompts(policy, IMAGES, QUESTIONS), encode_prompts(built, IMAGES, QUESTIONS)
    for name, tensor in fresh.model_inputs().items():
        assert torch.equal(tensor, getattr(loaded, name)), name
    assert load_policy(tiny_folder, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def as_real_checkpoint_layout(tiny_folder, folder):
    """Rewrite a tiny folder the way Qwen/Qwen2.5-VL-*-Instruct ships: sharded safetensors and a
    preprocessor_config.json naming the stock Qwen2_5_VLProcessor."""
    policy = load_policy(tiny_folder)
    policy.model.save_pretrained(folder, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_folder / name, folder / name)
    image_processor = json.loads((tiny_folder / "processor_config.json").read_text())["image_processor"]
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**image_processor, "processor_class": "Qwen2_5_VLProcessor"})
    )
    return folder


def test_loads_a_real_checkpoint_layout(tiny_folder, tmp_path, policy):
    folder = as_real_checkpoint_layout(tiny_folder, tmp_path / "real")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "processor_config.json").exists()
    real = load_policy(folder)
    assert type(real.processor).__name__ in ("Qwen2_5_VLProcessor", "ImageOnlyQwenVLProcessor")
    for name, tensor in policy.model.state_dict().items():
        assert torch.equal(tensor, real.model.state_dict()[name]), name
    expected, got = encode_prompts(policy, IMAGES, QUESTIONS), encode_prompts(real, IMAGES, QUESTIONS)
    for name, tensor in expected.model_inputs().items():
        assert torch.allclose(tensor, getattr(got, name), atol=1e-5), name


# --- load errors ------------------------------------------------------------------------------------------------------


def broken_copy(tiny_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    return folder


def test_load_errors_name_the_folder_and_what_is_wrong(tiny_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "absent")

    folder = broken_copy(tiny_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken has no config\.json"):
        load_policy(folder)
    shutil.rmtree(folder)

    folder = broken_copy(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_policy(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(folder)
    shutil.rmtree(folder)

    folder = broken_copy(tiny_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_policy(folder)
    weights = (tiny_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="could not read the weights"):
        load_policy(folder)
    shutil.rmtree(folder)

    folder = broken_copy(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 2 * SMALL.text_mlp
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights in .*broken"):
        load_policy(folder)


# --- batching, forward/backward, log-probs ---------------------------------------------------------------------------


def test_prompt_batch_layout(policy):
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    image_token = policy.model.config.image_token_id
    # 112 x 112 pixels -> 8 x 8 patches -> 16 tokens; 140 x 112 keeps its aspect within 112² pixels: 112 x 84 -> 12
    assert prompts.image_grid_thw.tolist() == [[1, 8, 8], [1, 6, 8]]
    assert (prompts.input_ids == image_token).sum(dim=1).tolist() == [SMALL.image_tokens, 12]
    assert prompts.pixel_values.shape[0] == 64 + 48
    assert torch.equal(prompts.mm_token_type_ids == 1, prompts.input_ids == image_token)
    assert prompts.attention_mask[:, -1].all() and not prompts.attention_mask[1, 0]  # left padding
    with pytest.raises(ValueError, match="same length"):
        encode_prompts(policy, IMAGES, QUESTIONS[:1])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        encode_prompts(policy, [IMAGES[0], "image.png"], QUESTIONS)


def test_sequence_batch_reuses_each_prompt_for_its_members(policy):
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    completions = [[40, 41, 42], [43], [44, 45], [2]]
    batch = encode_sequences(policy, prompts, completions, [1, 0, 1, 1])
    width = prompts.prompt_length
    assert batch.input_ids.shape == (4, width + 3) and batch.completion_length == 3
    assert torch.equal(batch.input_ids[0, :width], prompts.input_ids[1])
    images = [prompts.pixel_values[:64], prompts.pixel_values[64:]]  # 64 and 48 patches
    assert torch.equal(batch.pixel_values, torch.cat([images[1], images[0], images[1], images[1]]))
    assert batch.image_grid_thw.tolist() == [[1, 6, 8], [1, 8, 8], [1, 6, 8], [1, 6, 8]]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    assert batch.input_ids[1, width:].tolist() == [43, policy.tokenizer.pad_token_id, policy.tokenizer.pad_token_id]
    assert not batch.mm_token_type_ids[:, width:].any()
    image_pad = policy.model.config.image_token_id
    with pytest.raises(ValueError, match=r"completion_ids\[1\] contains image"):
        encode_sequences(policy, prompts, [[40], [41, image_pad]], [0, 1])
    with pytest.raises(ValueError, match=r"completion_ids\[0\] is empty"):
        encode_sequences(policy, prompts, [[]], [0])
    with pytest.raises(ValueError, match=r"prompt_index\[0\] = 2"):
        encode_sequences(policy, prompts, [[40]], [2])


def test_completion_logprobs_match_a_full_forward_in_float64(policy):
    model = policy.model.double()
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    prompts.pixel_values = prompts.pixel_values.double()
    batch = encode_sequences(policy, prompts, [[40, 41, 42, 2], [43, 44], [45]], [0, 1, 1])
    logp, mask = completion_logprobs(model, batch)
    assert logp.dtype == torch.float64 and logp.shape == mask.shape == (3, 4)

    with torch.no_grad():
        full_logits = model(**batch.model_inputs(), use_cache=False).logits
    width = prompts.prompt_length
    predicting = full_logits[:, width - 1 : width - 1 + batch.completion_length]
    manual = torch.log_softmax(predicting, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, manual * mask, rtol=0, atol=1e-12)
    assert logp[1, 2:].eq(0).all() and (logp[mask.bool()] < 0).all()

    logp_again, entropy, _ = completion_logprobs_and_entropy(model, batch)
    torch.testing.assert_close(logp_again, logp, rtol=0, atol=1e-12)
    probabilities = torch.softmax(predicting, dim=-1)
    torch.testing.assert_close(entropy, -(probabilities * probabilities.log()).sum(-1) * mask, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_completion_logprobs_do_not_depend_on_padding(policy, dtype, tolerance):
    model = policy.model.to(dtype)
    completion = [40, 41, 42]
    alone = encode_prompts(policy, IMAGES[:1], QUESTIONS[1:])
    padded = encode_prompts(policy, IMAGES[::-1], [QUESTIONS[0] + " Be precise, please.", QUESTIONS[1]])
    for prompts in (alone, padded):
        prompts.pixel_values = prompts.pixel_values.to(dtype)
    with torch.no_grad():
        logp_alone, _ = completion_logprobs(model, encode_sequences(policy, alone, [completion], [0]))
        batch = encode_sequences(policy, padded, [[43, 44, 45, 46, 47], completion], [0, 1])
        logp_padded, _ = completion_logprobs(model, batch)
    assert not batch.attention_mask[1, 0] and not batch.attention_mask[1, -1]  # padded on both sides
    torch.testing.assert_close(logp_padded[1, :3], logp_alone[0], rtol=0, atol=tolerance)


def test_batched_vision_windows_equal_transformers_per_window_attention_in_float64():
    """Windows of several lengths, interleaved (a 56-pixel window over 112x112 and 84x140 images), and a
    full-attention block: the batched attention gives transformers' per-window loop's features and gradients."""
    spec = dataclasses.replace(SMALL, vision_depth=2, vision_window=56, vision_full_attention_blocks=(1,))
    policy = build_tiny_vlm(CORPUS, spec, seed=0)
    visual = policy.model.model.visual.double()
    attentions = [module for module in visual.modules() if isinstance(module, Qwen2_5_VLVisionAttention)]
    assert attentions and all(type(module) is BatchedWindowVisionAttention for module in attentions)
    window_lengths = set()
    attentions[0].register_forward_pre_hook(
        lambda module, args, kwargs: window_lengths.update(kwargs["cu_seqlens"].diff().tolist()), with_kwargs=True
    )
    prompts = encode_prompts(policy, [IMAGES[0], shapes_image("green", (7, 7, 35, 49), size=(84, 140))], QUESTIONS)

    def features_and_gradients():
        visual.zero_grad()
        features = visual(prompts.pixel_values.double(), grid_thw=prompts.image_grid_thw).pooler_output
        (features * torch.linspace(-1, 1, features.numel(), dtype=torch.float64).view_as(features)).sum().backward()
        return features.detach(), {name: p.grad.clone() for name, p in visual.named_parameters()}

    batched, batched_grads = features_and_gradients()
    assert len(window_lengths) >= 3
    for module in attentions:
        module.__class__ = Qwen2_5_VLVisionAttention
    looped, looped_grads = features_and_gradients()
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)
    for name, grad in looped_grads.items():
        torch.testing.assert_close(batched_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert any(grad.abs().max() > 0 for grad in looped_grads.values())


def test_loaded_policies_batch_their_vision_windows(policy):
    kinds = {type(m) for m in policy.model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)}
    assert kinds == {BatchedWindowVisionAttention}


def test_forward_backward_gives_finite_gradients_everywhere(policy):
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    batch = encode_sequences(policy, prompts, [[40, 41, 2], [42], [43, 44]], [0, 0, 1])
    logp, mask = completion_logprobs(policy.model, batch)
    (-(logp * mask).sum() / mask.sum()).backward()
    for name, parameter in policy.model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert policy.model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_shared_image_encoding_gives_the_per_member_gradient_in_float64(policy):
    """Members of one prompt share one vision-tower pass; the gradient equals one encoding per member (the image's
    gradient is the sum over its members either way; the vision tower's float32 rotary embedding rounds its own
    parameters' gradients to float32, hence their tolerance of 1e-5 of the largest element)."""
    model = policy.model.double()
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    prompts.pixel_values = prompts.pixel_values.double()
    batch = encode_sequences(policy, prompts, [[40, 41, 2], [42], [43, 44], [45, 46, 47]], [1, 0, 1, 1])
    gradients = []
    for logits in (
        lambda: completion_logits(model, batch),
        lambda: model(**batch.model_inputs(), use_cache=False, logits_to_keep=batch.completion_length + 1).logits[
            :, :-1
        ],
    ):
        model.zero_grad(set_to_none=True)
        logp = torch.log_softmax(logits(), dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        (logp * batch.completion_mask * torch.arange(1.0, 5.0, dtype=torch.float64).unsqueeze(1)).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    shared, per_member = gradients
    assert shared.keys() == per_member.keys()
    for name in shared:  # the vision tower's float32 rotary embedding rounds its own gradient to float32
        scale = 1e-5 * float(per_member[name].abs().max()) if name.startswith("model.visual.") else 0.0
        torch.testing.assert_close(
            shared[name], per_member[name], rtol=0, atol=max(scale, 1e-10), msg=lambda m, n=name: f"{n}: {m}"
        )
    assert shared["model.visual.patch_embed.proj.weight"].abs().sum() > 0


def test_shared_prompt_scoring_equals_full_sequences_in_float64(policy):
    """Each prompt runs once and its members attend to its keys/values: log-probs, entropies and every parameter's
    gradient equal scoring each prompt + completion in full (float64 norms), with left-padded prompts, members of
    different lengths (one of a single token) and a prompt shared by three members."""
    model = use_input_dtype_norms(policy.model.double())
    prompts = encode_prompts(policy, IMAGES, [QUESTIONS[0], QUESTIONS[1] + " Be precise."])
    prompts.pixel_values = prompts.pixel_values.double()
    completions, owners = [[40, 41, 42, 2], [43, 44], [45], [46, 47, 48]], [1, 0, 1, 1]
    weights = torch.arange(1.0, 5.0, dtype=torch.float64).unsqueeze(1)
    results = []
    for score in (
        lambda: completion_logprobs_and_entropy(model, encode_sequences(policy, prompts, completions, owners)),
        lambda: shared_prompt_logprobs_and_entropy(
            model, prompt_states(model, prompts), encode_completions(policy, completions, owners)
        ),
    ):
        model.zero_grad(set_to_none=True)
        logp, entropy, mask = score()
        ((logp + 0.1 * entropy) * weights).sum().backward()
        results.append(
            (logp.detach(), entropy.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    (full_logp, full_entropy, full_mask, full_grads), (logp, entropy, mask, grads) = results
    torch.testing.assert_close(mask, full_mask, rtol=0, atol=0)
    torch.testing.assert_close(logp, full_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, full_entropy, rtol=0, atol=1e-12)
    assert grads.keys() == full_grads.keys() and full_grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0
    for name, grad in grads.items():  # the vision tower's float32 rotary embedding rounds its own gradients
        scale = 1e-5 * float(full_grads[name].abs().max()) if name.startswith("model.visual.") else 0.0
        torch.testing.assert_close(
            grad, full_grads[name], rtol=0, atol=max(scale, 1e-10), msg=lambda m, n=name: f"{n}: {m}"
        )


def test_shared_prompt_scoring_in_float32_and_its_errors(policy):
    model = policy.model
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    completions, owners = [[40, 41, 42, 2], [43, 44]], [1, 0]
    with torch.no_grad():
        full, _ = completion_logprobs(model, encode_sequences(policy, prompts, completions, owners))
        shared, _, _ = shared_prompt_logprobs_and_entropy(
            model, prompt_states(model, prompts), encode_completions(policy, completions, owners)
        )
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"completion_ids\[1\] is empty"):
        encode_completions(policy, [[40], []], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        encode_completions(policy, [[40]], [0, 1])
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        prompt_states(model, prompts)


# --- generation -------------------------------------------------------------------------------------------------------


def test_suppressed_tokens_are_the_control_tokens_but_not_eos(policy):
    tokenizer = policy.tokenizer
    suppressed = set(suppressed_token_ids(tokenizer))
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>")
    assert {tokenizer.convert_tokens_to_ids(name) for name in names} <= suppressed
    assert tokenizer.eos_token_id not in suppressed
    assert not suppressed & {tokenizer.convert_tokens_to_ids(token) for token in ANSWER_SKELETON_TOKENS}


def with_biased_head(policy, bias: dict[int, float]):
    """Untie the LM head and add a bias, so a random model favours chosen tokens."""
    head = torch.nn.Linear(policy.model.lm_head.in_features, policy.model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(policy.model.lm_head.weight)
        head.bias.zero_()
        for token_id, value in bias.items():
            head.bias[token_id] = value
    policy.model.lm_head = head
    return policy


def test_generate_round_trip_stops_at_eos_and_never_samples_vision_tokens(policy):
    tokenizer = policy.tokenizer
    eos, image_pad = tokenizer.eos_token_id, policy.model.config.image_token_id
    # Without suppression the image placeholder would win every step; eos has ~10% per step.
    with_biased_head(policy, {image_pad: 30.0, tokenizer.convert_tokens_to_ids("<|vision_start|>"): 30.0, eos: 3.7})
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    rollouts = generate(policy, prompts, num_return_sequences=4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)
    completions, prompt_index, texts = rollouts.completion_ids, rollouts.prompt_index, rollouts.texts
    assert rollouts.old_logp is None and rollouts.engine_logp is None
    assert prompt_index == [0, 0, 0, 0, 1, 1, 1, 1] and len(completions) == len(texts) == 8
    suppressed = set(suppressed_token_ids(tokenizer))
    for ids, text in zip(completions, texts):
        assert not suppressed & set(ids)
        assert (ids[-1] == eos and ids.count(eos) == 1) or (len(ids) == 8 and eos not in ids)
        assert text == tokenizer.decode(ids, skip_special_tokens=True) and "<|im_end|>" not in text
    assert {ids[-1] == eos for ids in completions} == {True, False}

    again = generate(policy, prompts, num_return_sequences=4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=7)
    other = generate(policy, prompts, num_return_sequences=4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=8)
    assert again.completion_ids == completions and other.completion_ids != completions

    batch = encode_sequences(policy, prompts, completions, prompt_index)
    logp, mask = completion_logprobs(policy.model, batch)
    assert torch.isfinite(logp).all() and mask.sum() == sum(len(ids) for ids in completions)


def transformers_generate(policy, prompts, copies: int, max_new_tokens: int, seed: int, **sampling) -> list[list[int]]:
    """Hugging Face `generate` on `copies` copies of each prompt, completions cut after their eos: the reference of
    visurf_ray's `generate`."""
    tokenizer = policy.tokenizer
    prompts = prompts.select([row for row in range(len(prompts)) for _ in range(copies)])
    do_sample = sampling.get("do_sample", True)
    options = {"temperature": sampling.get("temperature", 1.0), "top_p": sampling.get("top_p", 1.0), "top_k": 0}
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = policy.model.generate(
            **prompts.model_inputs(),
            do_sample=do_sample,
            **(options if do_sample else {}),
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=suppressed_token_ids(tokenizer),
        )
    eos = tokenizer.eos_token_id
    rows = sequences[:, prompts.prompt_length :].tolist()
    return [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in rows]


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.7}, {"top_p": 0.8}, {"do_sample": False}],
    ids=["temperature-1", "temperature-0.7", "top-p-0.8", "greedy"],
)
def test_generate_gives_transformers_generate_tokens(policy, sampling):
    """Each prompt run once for all its copies and finished rows dropped from the batch: still the tokens of
    transformers' `generate` (its multinomial draws included), row for row."""
    eos = policy.tokenizer.eos_token_id
    with_biased_head(policy, {eos: 3.0})  # rows end at different steps, so the batch shrinks as it decodes
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    rollouts = generate(policy, prompts, num_return_sequences=6, max_new_tokens=24, seed=3, **sampling)
    reference = transformers_generate(policy, prompts, copies=6, max_new_tokens=24, seed=3, **sampling)
    assert rollouts.completion_ids == reference
    if sampling.get("do_sample", True):
        assert len({len(ids) for ids in reference}) > 2


def test_cached_generation_and_training_forward_give_the_same_logits(policy):
    """Generation (KV cache, positions from cached rope deltas) and the one-pass training forward over prompt +
    completion (positions from mm_token_type_ids) must score every completion token alike."""
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    with torch.no_grad():
        generated = policy.model.generate(
            **prompts.model_inputs(),
            do_sample=False,
            max_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=policy.tokenizer.pad_token_id,
            eos_token_id=policy.tokenizer.eos_token_id,
            suppress_tokens=suppressed_token_ids(policy.tokenizer),
        )
    step_logits = torch.stack(generated.logits, dim=1)  # [B, steps, V], before logits processors
    completions = generated.sequences[:, prompts.prompt_length :].tolist()
    batch = encode_sequences(policy, prompts, completions, [0, 1])
    with torch.no_grad():
        training_logits = completion_logits(policy.model, batch)
    assert training_logits.shape == step_logits.shape
    torch.testing.assert_close(training_logits, step_logits, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_load_policy_on_cuda_defaults_to_bfloat16(tiny_folder):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: load_policy defaults to bfloat16 only on GPU")
    policy = load_policy(tiny_folder)
    assert policy.device.type == "cuda" and policy.model.dtype == torch.bfloat16
    prompts = encode_prompts(policy, IMAGES, QUESTIONS)
    rollouts = generate(policy, prompts, num_return_sequences=2, max_new_tokens=8, seed=0)
    completions, prompt_index = rollouts.completion_ids, rollouts.prompt_index
    batch = encode_sequences(policy, prompts.to(policy.device), completions, prompt_index)
    logp, entropy, mask = completion_logprobs_and_entropy(policy.model, batch)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all() and torch.isfinite(entropy).all()
