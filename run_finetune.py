#!/usr/bin/env python
"""Fine-tune a wav2vec2/XLS-R model with CTC on one language: the paper's upstream step.

    accelerate launch run_finetune.py --language en \
        --model_name_or_path facebook/wav2vec2-xls-r-300m --output_dir models/xlsr-en \
        --num_train_epochs 100 --per_device_train_batch_size 16 --learning_rate 3e-4 --bf16

Reads like the Hugging Face CTC example, for transformers 5. Every ``TrainingArguments`` flag
passes through; the defaults evaluate and save each epoch and keep the checkpoint with the
lowest eval CTC loss, as the paper does.
"""

import logging
import os
import sys

import datasets
import transformers
from transformers import HfArgumentParser, set_seed

from utils.data import DataArguments, DataCollatorCTCWithPadding, SAMPLING_RATE, build_processor, build_vocab, load_raw_splits, normalize_splits, prepare_features, unseen_chars
from utils.languages import resolve_language
from utils.model import ModelArguments, frames_for_samples, load_ctc_model, load_feature_extractor, receptive_field
from utils.runs import claim_output_dir, run_cli
from utils.training import CTCTrainer, CTCTrainingArguments

logger = logging.getLogger(__name__)


def main():
    # 1. Arguments: model, data and every TrainingArguments flag (or one JSON file holding them).
    parser = HfArgumentParser((ModelArguments, DataArguments, CTCTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    language = resolve_language(data_args.language)

    # 2. Logging, on the main process only.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    level = logging.INFO if training_args.should_log else logging.WARNING
    for name in ("__main__", "utils"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity(level)
    logger.info("fine-tuning %s on %s (%s)", model_args.model_name_or_path, language.name, language.code)

    # 3. The output dir must be new or hold this same run, which then resumes from its last checkpoint.
    signature = {
        "script": "run_finetune.py",
        "language": language.code,
        "model_name_or_path": model_args.model_name_or_path,
        "dataset": data_args.data_dir or data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
    }
    last_checkpoint = claim_output_dir(training_args.output_dir, signature, training_args.process_index == 0)
    set_seed(training_args.seed)

    # 4. Load the three splits and normalise their transcripts.
    with training_args.main_process_first(desc="load data"):
        raw = normalize_splits(load_raw_splits(data_args, language), language, data_args.chars_to_ignore)

    # 5. Character vocabulary from the training split only; report what the other splits lack.
    vocab = build_vocab(raw["train"]["text"])
    for split in ("validation", "test"):
        missing = unseen_chars(raw[split]["text"], vocab)
        if missing:
            logger.warning("%s: %d characters not in the training vocabulary map to [UNK]: %s", split, sum(missing.values()), dict(missing.most_common(10)))

    # 6. Processor (written to output_dir) and model with a CTC head sized to the vocabulary.
    with training_args.main_process_first(desc="processor"):
        processor = build_processor(vocab, load_feature_extractor(model_args), training_args.output_dir)
    model = load_ctc_model(model_args, processor)

    # 7. Audio to input_values, text to labels; skip (and count) what cannot be trained on.
    with training_args.main_process_first(desc="features"):
        vectorized = prepare_features(
            raw,
            processor,
            frames_for_samples=lambda n: frames_for_samples(model.config, n),
            min_samples=max(receptive_field(model.config), int(data_args.min_duration_in_seconds * SAMPLING_RATE)),
            max_samples=int(data_args.max_duration_in_seconds * SAMPLING_RATE),
            num_proc=data_args.preprocessing_num_workers,
        )

    # 8. Trainer: padding collator; CER/WER of greedy transcripts against each split's own text.
    trainer = CTCTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorCTCWithPadding(processor),
        train_dataset=vectorized["train"],
        eval_dataset=vectorized["validation"],
        processing_class=processor,
    )

    # 9. Train (resuming if a checkpoint of this run exists), then save the kept model and processor.
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics | {"train_samples": len(vectorized["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # 10. Evaluate the kept checkpoint on validation and test.
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = trainer.evaluate(vectorized[split], metric_key_prefix=prefix) | {f"{prefix}_samples": len(vectorized[split])}
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)

    # 11. Model card, and the Hub push when asked for.
    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "automatic-speech-recognition",
        "language": language.code,
        "dataset": data_args.data_dir or data_args.dataset_name,
        "tags": ["ctc", "language-tickets"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    run_cli(main)
