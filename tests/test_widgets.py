"""Drive each widget's controls as a learner would and check the numbers it shows against course_lib."""

import math
import re

import ipywidgets as widgets
import pytest
import torch

from course_lib.attention import scaled_dot_product_attention
from course_lib.masks import causal_mask, token_mask_from_lengths
from course_lib.memory import RECIPES, Parallelism, per_device_memory
from course_lib.widgets import AttentionHeatmap, MaskExplorer, MemoryCalculator
from course_lib.widgets.memory_calculator import PRESETS
from course_lib.widgets.render import figure_to_png, html_table

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
Q = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
PNG_MAGIC = b"\x89PNG"


def shown(html: str, css_class: str) -> list[list[str]]:
    """The cells of the table with this class, as text, by data-row and data-col."""
    cells = re.findall(rf'<td class="{css_class}" data-row="(\d+)" data-col="(\d+)"[^>]*>([^<]*)</td>', html)
    rows: dict[int, dict[int, str]] = {}
    for r, c, text in cells:
        rows.setdefault(int(r), {})[int(c)] = text
    return [[row[c] for c in sorted(row)] for _, row in sorted(rows.items())]


def shown_numbers(html: str, css_class: str) -> torch.Tensor:
    return torch.tensor([[float(x) for x in row] for row in shown(html, css_class)], dtype=torch.float64)


@pytest.fixture
def heatmap():
    return AttentionHeatmap(Q, X, X, tokens=["x0", "x1", "x2"])


def test_heatmap_is_a_widget_with_a_rendered_picture(heatmap):
    assert isinstance(heatmap, widgets.VBox)
    assert heatmap.image.value.tobytes().startswith(PNG_MAGIC)
    assert "course-attention-heatmap" in heatmap._dom_classes


@pytest.mark.parametrize("row", [0, 1, 2])
def test_heatmap_query_slider_shows_that_rows_weights_and_output(heatmap, row):
    heatmap.query.value = row
    output, weights = scaled_dot_product_attention(Q.double(), X.double(), X.double())
    torch.testing.assert_close(shown_numbers(heatmap.table.value, "course-weight")[0], weights[row], atol=5e-5, rtol=0)
    torch.testing.assert_close(shown_numbers(heatmap.table.value, "course-output")[0], output[row], atol=5e-5, rtol=0)
    scores = (Q[row] @ X.T).double() / math.sqrt(2)
    torch.testing.assert_close(shown_numbers(heatmap.table.value, "course-score")[0], scores, atol=5e-5, rtol=0)


def test_heatmap_scaling_toggle_changes_the_weights(heatmap):
    heatmap.query.value = 2
    scaled = shown_numbers(heatmap.table.value, "course-weight")[0]
    before = heatmap.image.value
    heatmap.scaled.value = False
    unscaled = shown_numbers(heatmap.table.value, "course-weight")[0]
    _, expected = scaled_dot_product_attention(Q.double(), X.double(), X.double(), scale=1.0)
    torch.testing.assert_close(unscaled, expected[2], atol=5e-5, rtol=0)
    assert unscaled[2] > scaled[2]  # without 1/sqrt(d_k) the largest score takes more of the weight
    assert heatmap.image.value != before


def test_heatmap_editing_a_cell_updates_weights_and_output(heatmap):
    heatmap.matrix.value, heatmap.row.value, heatmap.col.value = "K", 1, 0
    assert heatmap.value.value == X[1, 0]
    heatmap.value.value = 3.0
    heatmap.query.value = 1
    k = X.double().clone()
    k[1, 0] = 3.0
    output, weights = scaled_dot_product_attention(Q.double(), k, X.double())
    torch.testing.assert_close(shown_numbers(heatmap.table.value, "course-weight")[0], weights[1], atol=5e-5, rtol=0)
    torch.testing.assert_close(shown_numbers(heatmap.table.value, "course-output")[0], output[1], atol=5e-5, rtol=0)
    heatmap.matrix.value = "V"
    assert heatmap.value.value == X[1, 0]  # the editor shows the chosen cell of the chosen matrix


def test_heatmap_does_not_modify_the_callers_tensors(heatmap):
    heatmap.matrix.value = "Q"
    heatmap.value.value = 9.0
    assert Q[0, 0] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((Q, X, torch.ones(2, 2)), "v must have one row per key"),
        ((Q[0], X, X), "q must be a 2-D tensor"),
        ((Q, X[:, :1], X), "k must have the same last dimension"),
    ],
)
def test_heatmap_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        AttentionHeatmap(*args)


def test_heatmap_tokens_must_name_every_position():
    with pytest.raises(ValueError, match="tokens must name the 3 positions"):
        AttentionHeatmap(Q, X, X, tokens=["a"])


VOCAB = [f"t{i}" for i in range(40)]
VOCAB[0] = "[PAD]"


@pytest.fixture
def explorer():
    return MaskExplorer(torch.arange(10, 40).reshape(3, 10), pad_id=0, vocab=VOCAB)


def test_explorer_default_is_causal_with_right_padding(explorer):
    assert isinstance(explorer, widgets.VBox) and explorer.image.value.tobytes().startswith(PNG_MAGIC)
    explorer.sequence.value = 1  # one padding token
    expected = causal_mask(10) & token_mask_from_lengths([9], max_len=10)[0]
    assert shown_numbers(explorer.table.value, "course-mask-cell").int().tolist() == expected.int().tolist()


def test_explorer_controls_drive_the_mask(explorer):
    explorer.seq_len.value = 6
    explorer.padding[2].value = 4
    explorer.side.value = "left"
    explorer.sequence.value = 2
    shown_mask = shown_numbers(explorer.table.value, "course-mask-cell").bool()
    expected = causal_mask(6) & token_mask_from_lengths([2], max_len=6, side="left")[0]
    assert torch.equal(shown_mask, expected)
    assert "rows [0, 1, 2, 3] see no key" in explorer.table.value
    tokens = shown(explorer.tokens_view.value, "course-mask-token")[0]
    assert tokens == ["[PAD]"] * 4 + ["t30", "t31"]
    explorer.causal.value = False
    expected = token_mask_from_lengths([2], max_len=6, side="left")[0].expand(6, 6)
    assert torch.equal(shown_numbers(explorer.table.value, "course-mask-cell").bool(), expected)


def test_explorer_padding_sliders_follow_the_length(explorer):
    explorer.seq_len.value = 3
    assert all(slider.max == 2 for slider in explorer.padding)
    assert explorer.lengths() == [3, 2, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_ids": torch.ones(3)}, "token_ids must be an integer tensor"),
        ({"padding": [0, 12, 0]}, "padding must give each of the 3 sequences"),
        ({"vocab": ["a"]}, r"vocab must name every id in token_ids and pad_id \(up to 39\), got 1 entries"),
        ({"pad_id": -1}, "pad_id must be an int >= 0"),
        ({"token_ids": torch.arange(-1, 29).reshape(3, 10)}, "token_ids must be >= 0"),
    ],
)
def test_explorer_bad_inputs(kwargs, message):
    args = {"token_ids": torch.arange(10, 40).reshape(3, 10), "pad_id": 0, "vocab": VOCAB}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MaskExplorer(args.pop("token_ids"), **args)


def test_snapshots_are_static_pngs_of_the_current_state(heatmap, explorer):
    for widget in (heatmap, explorer):
        image = widget.snapshot()
        assert image.data.startswith(PNG_MAGIC) and image.format == "png"
    before = heatmap.snapshot().data
    heatmap.query.value = 2
    assert heatmap.snapshot().data != before


def test_render_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="figure must be a matplotlib Figure"):
        figure_to_png("not a figure")
    with pytest.raises(ValueError, match="one label per row"):
        html_table([[1, 2]], ["r0", "r1"], ["a", "b"], "cls")
    table = html_table([[1, "<b>"]], ["r0"], ["a", "b"], "cls", caption="c")
    assert shown(table, "cls") == [["1", "&lt;b&gt;"]]


@pytest.fixture(scope="module")
def char_gpt():
    from course_lib.model import GPT, GPTConfig
    from course_lib.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text("abcdefgh .\n")
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)), tokenizer


def test_sampling_explorer_shows_next_token_probs_for_its_settings(char_gpt):
    from course_lib.model import next_token_probs
    from course_lib.widgets import SamplingExplorer

    model, tokenizer = char_gpt
    explorer = SamplingExplorer(model, tokenizer, prompt="abc", length=5)
    logits = model(torch.tensor([tokenizer.encode("abc")])).logits[0, -1]
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.3)):
        explorer.temperature.value, explorer.top_k.value, explorer.top_p.value = temperature, top_k, top_p
        expected = next_token_probs(logits, temperature, top_k or None, top_p).sort(descending=True).values[:10]
        torch.testing.assert_close(shown_numbers(explorer.table.value, "course-sampling-prob")[:, 0], expected.double(),
                                   atol=5e-5, rtol=0)  # fmt: skip
    assert explorer.image.value.tobytes().startswith(PNG_MAGIC)


def test_sampling_explorer_continuation_is_generate_with_the_same_seed(char_gpt):
    from course_lib.widgets import SamplingExplorer

    model, tokenizer = char_gpt
    explorer = SamplingExplorer(model, tokenizer, prompt="ab", length=8, seed=3)
    expected = model.generate(torch.tensor([tokenizer.encode("ab")]), 8, generator=torch.Generator().manual_seed(3))
    assert tokenizer.decode(expected[0, 2:].tolist()) in explorer.continuation.value.replace("&#x27;", "'")
    explorer.prompt.value = "hg"
    assert "<b>hg</b>" in explorer.continuation.value
    with pytest.raises(TypeError, match="model must be a course_lib GPT"):
        SamplingExplorer(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(TypeError, match="tokenizer must have encode"):
        SamplingExplorer(model, object())


def test_model_attention_shows_the_chosen_layer_head_and_query(char_gpt):
    from course_lib.widgets import ModelAttention, gpt_attention

    model, tokenizer = char_gpt
    widget = ModelAttention(gpt_attention(model, tokenizer), "abc.defg")
    weights = torch.stack(
        [w[0] for w in model(torch.tensor([tokenizer.encode("abc.defg")]), return_attention=True).attentions]
    )
    for layer, head, query in ((0, 0, 7), (1, 1, 3), (1, 0, 0)):
        widget.layer.value, widget.head.value, widget.query.value = layer, head, query
        torch.testing.assert_close(shown_numbers(widget.table.value, "course-model-weight")[0],
                                   weights[layer, head, query].double(), atol=5e-5, rtol=0)  # fmt: skip
    widget.prompt.value = "hh"
    assert (
        widget.query.max == 1
        and widget.query.value == 1
        and len(shown(widget.table.value, "course-model-weight")[0]) == 2
    )
    assert widget.snapshot().data.startswith(PNG_MAGIC)


def test_model_attention_bad_input(char_gpt):
    from course_lib.widgets import ModelAttention, gpt_attention

    model, tokenizer = char_gpt
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\) and head in \[0, 2\)"):
        ModelAttention(gpt_attention(model, tokenizer), "abc", layer=2)
    with pytest.raises(TypeError, match="attention_fn must be a function"):
        ModelAttention("not callable", "abc")
    with pytest.raises(ValueError, match="must return weights"):
        ModelAttention(lambda text: (["a"], torch.ones(1, 1, 2, 2)), "a")
    with pytest.raises(TypeError, match="model must be a course_lib GPT"):
        gpt_attention(torch.nn.Linear(2, 2), tokenizer)


def test_encoder_attention_reads_a_real_pretrained_encoder():
    from transformers import AutoModel, AutoTokenizer

    from course_lib.assets import minilm_dir
    from course_lib.widgets import ModelAttention, encoder_attention

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    eager = AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager")
    widget = ModelAttention(encoder_attention(eager, tokenizer), "the cat sat")
    assert widget.tokens == ["[CLS]", "the", "cat", "sat", "[SEP]"] and widget.weights.shape == (6, 12, 5, 5)
    torch.testing.assert_close(widget.weights.sum(-1), torch.ones(6, 12, 5))
    sdpa = AutoModel.from_pretrained(minilm_dir())
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        encoder_attention(sdpa, tokenizer)("the cat")


# The memory calculator


def calculator_gib(calculator) -> list[float]:
    return shown_numbers(calculator.table.value, "course-memory-gib").flatten().tolist()


def expected_gib(shape, batch, seq, recipe="mixed", optimizer="adam", checkpointing=False, parallel=None,
                inference=False) -> list[float]:  # fmt: skip
    memory = per_device_memory(shape, batch, seq, RECIPES[recipe], optimizer, checkpointing,
                               parallel or Parallelism(), inference)  # fmt: skip
    return [round(v / 2**30, 3) for v in (*memory.as_dict().values(), memory.total)]


def test_memory_calculator_default_shows_the_first_model_unsharded():
    calculator = MemoryCalculator()
    assert isinstance(calculator, widgets.VBox) and calculator.image.value.tobytes().startswith(PNG_MAGIC)
    gpt2 = PRESETS["GPT-2 small (124M)"]
    assert calculator_gib(calculator) == expected_gib(gpt2, 1, 1024)
    # 124,439,808 parameters x 16 bytes (2 + 2 + 12) = 1.85 GiB of states: fits an 80 GiB GPU
    assert calculator_gib(calculator)[:3] == [0.232, 0.232, 1.391]
    assert "fits in 80 GiB" in calculator.verdict.value
    # what it assumes and leaves out is shown with the numbers
    assert "sequence parallelism" in calculator.notes.value and "log-softmax" in calculator.notes.value
    assert [value for _, value in calculator.gpu.options] == [24, 40, 80]  # GiB as the GPUs report them


def test_memory_calculator_controls_drive_the_numbers():
    calculator = MemoryCalculator()
    calculator.model.value = "LLaMA-2 7B"
    llama = PRESETS["LLaMA-2 7B"]
    assert calculator.seq.max == 4096
    calculator.seq.value, calculator.batch.value = 4096, 2
    calculator.precision.value, calculator.optimizer.value = "fp32", "sgd_momentum"
    calculator.checkpointing.value = True
    calculator.zero.value, calculator.dp.value, calculator.tp.value, calculator.pp.value = 2, 8, 2, 4
    parallel = Parallelism(dp=8, tp=2, pp=4, zero_stage=2)
    assert calculator_gib(calculator) == expected_gib(llama, 2, 4096, "fp32", "sgd_momentum", True, parallel)
    calculator.inference.value = True
    assert calculator_gib(calculator) == expected_gib(llama, 2, 4096, "fp32", inference=True, parallel=parallel)
    calculator.model.value = "GPT-2 small (124M)"  # a shorter context: the sequence follows
    assert calculator.seq.value == 1024 and calculator.seq.max == 1024


def test_memory_calculator_says_when_it_does_not_fit_and_when_settings_are_impossible():
    calculator = MemoryCalculator(model="GPT-3 175B", gpu_gib=80)
    assert "does not fit in 80 GiB" in calculator.verdict.value  # 175 B x 16 bytes = 2.5 TiB on one GPU
    calculator.tp.value = 5
    assert "tp=5 must divide n_head=96" in calculator.verdict.value and calculator.table.value == ""
    calculator.tp.value = 8
    assert calculator_gib(calculator) == expected_gib(PRESETS["GPT-3 175B"], 1, 1024, parallel=Parallelism(tp=8))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"model": "GPT-5"}, ValueError, "model must be one of"),
        ({"precision": "fp8"}, ValueError, "precision must be one of"),
        ({"gpu_gib": 12}, ValueError, "gpu_gib must be one of"),
        ({"gpu_gib": 141}, ValueError, "gpu_gib must be one of"),  # an H200's "141 GB" is not 141 GiB
        ({"presets": {"x": "not a shape"}}, TypeError, "presets must map names"),
    ],
)
def test_memory_calculator_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        MemoryCalculator(**kwargs)
