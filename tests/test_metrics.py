import numpy as np
import pytest
import torch
from transformers import AutoConfig, EvalPrediction, TrainingArguments, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from tests.conftest import TINY_CONFIG
from utils.data import build_processor
from utils.metrics import error_rates, greedy_transcripts
from utils.text import build_vocab
from utils.training import CTCTrainer


def _processor(tmp_path):
    fe = Wav2Vec2FeatureExtractor.from_pretrained(TINY_CONFIG)
    return build_processor(build_vocab(["hello world", "cat"]), fe, str(tmp_path))


def test_error_rates_hand_computed():
    # "kitten" -> "sitting": 3 edits over 6 characters; "a b" -> "a c": 1 over 3. Words: 1/1 and 1/2.
    rates = error_rates(["kitten", "a b"], ["sitting", "a c"])
    assert rates["cer"] == (3 + 1) / (6 + 3)
    assert rates["wer"] == (1 + 1) / (1 + 2)


def test_greedy_transcripts_merge_repeats_and_drop_blanks(tmp_path):
    processor = _processor(tmp_path)
    v = processor.tokenizer.get_vocab()
    blank, sep = v["[PAD]"], v["|"]
    # CTC output "hhee l <blank> l o | w w o r l d" -> "hello world"; the second row is padded with -100.
    row1 = [v[c] for c in "hhee"] + [v["l"], blank, v["l"], v["o"], sep, v["w"], v["w"], v["o"], v["r"], v["l"], v["d"]]
    row2 = [v["c"], v["a"], v["a"], blank, v["t"]] + [-100] * (len(row1) - 5)
    assert greedy_transcripts(np.array([row1, row2]), processor) == ["hello world", "cat"]


def test_references_are_the_dataset_text_not_decoded_labels(tmp_path):
    processor = _processor(tmp_path)
    v = processor.tokenizer.get_vocab()
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    model = Wav2Vec2ForCTC(AutoConfig.from_pretrained(TINY_CONFIG, vocab_size=len(v)))
    trainer = CTCTrainer(model=model, args=args, processing_class=processor)
    trainer._references = ["cut", "hello"]  # "u" is not in the training vocabulary
    trainer._ids = ["a.wav", "b.wav"]
    labels = np.array([[v["c"], v["[UNK]"], v["t"], -100, -100], [v[c] for c in "hello"]])
    predictions = np.array([[v["c"], v["[UNK]"], v["t"], -100, -100], [v[c] for c in "helo"] + [-100]])
    metrics = trainer._error_rates(EvalPrediction(predictions=predictions, label_ids=labels))
    expected = error_rates(["cut", "hello"], ["c[UNK]t", "helo"])
    assert metrics == expected
    assert metrics["cer"] == (5 + 1) / 8  # "u"->"[UNK]" is 1 substitution + 4 insertions; "hello"->"helo" 1 deletion


def test_prediction_step_blanks_padding_frames(tmp_path):
    processor = _processor(tmp_path)
    config = AutoConfig.from_pretrained(TINY_CONFIG, vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        model.lm_head.bias.fill_(0)
        model.lm_head.bias[0] = 50.0  # every real or padded frame predicts token 0, never the blank
    inputs = {"input_values": torch.randn(2, 16000), "attention_mask": torch.ones(2, 16000, dtype=torch.long)}
    inputs["attention_mask"][1, 8000:] = 0
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    trainer = CTCTrainer(model=model, args=args)
    _, pred_ids, _ = trainer.prediction_step(model, inputs, prediction_loss_only=False)
    frames = model._get_feat_extract_output_lengths(torch.tensor([16000, 8000])).tolist()
    assert pred_ids.shape == (2, frames[0])
    assert torch.all(pred_ids[0] == 0)
    assert torch.all(pred_ids[1, : frames[1]] == 0)
    assert torch.all(pred_ids[1, frames[1] :] == config.pad_token_id)


def test_per_utterance_rows_sum_to_jiwer_corpus_rates(tmp_path):
    from utils.metrics import corpus_rates, predictions_path, read_predictions, score_utterances, write_predictions

    refs = ["kitten", "a b", "hello world", "l'home és"]
    hyps = ["sitting", "a c", "", "lome es x"]
    rows = score_utterances(["k.wav", "ab.wav", "hw.wav", "lh.wav"], refs, hyps)
    assert [(r.char_edits, r.ref_chars, r.word_edits, r.ref_words) for r in rows[:3]] == [(3, 6, 1, 1), (1, 3, 1, 2), (11, 11, 2, 2)]
    expected = error_rates(refs, hyps)
    assert corpus_rates(rows) == expected  # the same integers divided: exactly equal
    path = predictions_path(tmp_path, "test")
    write_predictions(path, rows)
    assert read_predictions(path, expect_cer=expected["cer"], expect_count=4) == rows
    with pytest.raises(ValueError, match="holds 4 utterances but its results report 5"):
        read_predictions(path, expect_count=5)
    with pytest.raises(ValueError, match="sums to CER .* but its results report 0.500000"):
        read_predictions(path, expect_cer=0.5)
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match="line 5 is not a predictions row"):
        read_predictions(path)
