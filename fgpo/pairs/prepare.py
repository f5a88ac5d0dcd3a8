"""``fgpo prepare``: on-policy preference pairs from a model and a VQA/report dataset.

Named steps, per example: **answer** (the model's greedy answer is y-) -> **edit** (an Editor
makes the minimal edit y+, or a counterfactual y- when the model was right, and tags the differing
spans) -> **corrupt** (the lesion-corrupted image v' and ``rejected_image_path``) -> **record**.

The records are the reference JSON format the trainer reads: a list of objects with ``prompt``,
``chosen``, ``rejected`` (tagged), ``image_path``, optional ``rejected_image_path``, ``id``,
``qid``; plus ``was_correct``, ``answer_type``, ``dataset`` and ``corrupt_source`` for analysis.
Examples that yield no pair are counted by reason (``prepare_report.json``), never dropped
silently. Image paths in the records are absolute.

Library use (the demo passes its own greedy generator)::

    records = prepare_pairs(examples, answer_fn, ReferenceEditor.from_examples(examples),
                            CorruptConfig(mode="inpaint"), out_dir)
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..data import (
    LOADERS,
    DatasetError,
    SkipExample,
    VQAExample,
    has_tags,
    is_dicom,
    load_dataset,
    open_image,
)
from .corrupt import MODES, CorruptConfig, corrupt_example, load_segmenter, seed_from_id
from .editors import Editor, ReferenceEditor
from .journal import PairJournal
from .llm import LLMEditor, LLMEditorError

log = logging.getLogger(__name__)

AnswerFn = Callable[[VQAExample], str]


def prepare_pairs(
    examples: Iterable[VQAExample],
    answer_fn: AnswerFn,
    editor: Editor,
    corrupt_cfg: CorruptConfig | None,
    out_dir: str | Path,
    *,
    stats: Counter | None = None,
    image_dir: str | Path | None = None,
    journal: PairJournal | None = None,
) -> list[dict[str, Any]]:
    """Preference records for ``examples``; ``corrupt_cfg=None`` makes no corrupted images.

    ``answer_fn(example) -> str`` is the model's greedy answer. Corrupted images go to
    ``image_dir`` (default ``<out_dir>/rejected_images``). ``stats`` (a Counter), when given,
    receives ``pairs``, one ``skip:<reason>`` count per skipped example and ``corrupt:<source>``
    (annotation / segmenter / fallback / none). Duplicate pairs (same id, qid, chosen,
    rejected) are kept once. Errors of an LLM endpoint that persist after its
    retries (:class:`LLMEditorError`) propagate: they mean a misconfigured endpoint.

    ``journal`` (:class:`~fgpo.pairs.journal.PairJournal`): each example's outcome is written
    to it as soon as it is known, and examples it has done already are skipped (``--resume``).
    Returns the records made by this call.
    """
    stats = stats if stats is not None else Counter()
    img_dir = Path(image_dir) if image_dir is not None else Path(out_dir) / "rejected_images"
    records: list[dict[str, Any]] = []
    seen: set[tuple] = journal.seen if journal is not None else set()
    for ex in examples:
        key = (ex.id, ex.qid)
        if journal is not None and journal.done(key):
            continue
        counts: Counter = Counter()
        rec = _pair(ex, answer_fn, editor, corrupt_cfg, out_dir, img_dir, seen, counts)
        if journal is not None:
            journal.add(key, counts, rec)
        stats.update(counts)
        if rec is not None:
            records.append(rec)
    return records


def _pair(ex, answer_fn, editor, corrupt_cfg, out_dir, img_dir, seen, stats) -> dict | None:
    """One example: answer -> edit -> corrupt -> record (None when skipped, counted)."""
    stats["examples"] += 1
    try:  # step: answer
        y_minus = (answer_fn(ex) or "").strip()
    except DatasetError as e:  # the image went missing or does not decode
        stats["skip:unreadable_image"] += 1
        log.warning("skipping %s/%s: %s", ex.id, ex.qid, e)
        return None
    try:  # step: edit
        edit = editor.edit(ex, y_minus)
    except SkipExample as s:
        stats[f"skip:{s.reason}"] += 1
        return None
    if not (has_tags(edit.chosen) and has_tags(edit.rejected)):
        stats["skip:no_difference"] += 1
        return None
    key = (ex.id, ex.qid, edit.chosen, edit.rejected)
    if key in seen:
        stats["skip:duplicate"] += 1
        return None
    seen.add(key)
    rec: dict[str, Any] = {
        "id": ex.id,
        "qid": ex.qid,
        "prompt": ex.question,
        "chosen": edit.chosen,
        "rejected": edit.rejected,
        "image_path": _absolute(_trainer_image(ex.image_path, Path(out_dir) / "images")),
        "was_correct": edit.was_correct,
        "answer_type": ex.answer_type,
        "dataset": ex.dataset,
        "model_answer": y_minus,
        "editor": getattr(editor, "name", type(editor).__name__),
    }
    if corrupt_cfg is not None:  # step: corrupt
        try:
            res = corrupt_example(ex, corrupt_cfg, img_dir)
        except (DatasetError, OSError, ValueError) as e:  # e.g. an unreadable mask image
            stats["corrupt_failed"] += 1
            log.warning("no corrupted image for %s/%s: %s", ex.id, ex.qid, e)
            res = None
        if res is not None and res.path:
            rec["rejected_image_path"] = _absolute(res.path)
            rec["corrupt_source"] = res.source
            stats[f"corrupt:{res.source}"] += 1
        elif res is not None:  # no region and fallback="skip": no v' (has_corrupt = 0)
            stats["corrupt:none"] += 1
    stats["pairs"] += 1  # step: record
    return rec


def _absolute(path: str) -> str:
    # The trainer resolves relative paths against the JSON file's folder, not the working
    # directory this run used: write absolute ones.
    return str(Path(path).resolve())


def _trainer_image(path: str, image_dir: Path) -> str:
    """The image path for the record: DICOM files are written once as windowed PNGs (the
    trainer reads ordinary images), everything else is used as it is."""
    if not is_dicom(path):
        return path
    out = image_dir / f"{Path(path).stem}-{seed_from_id(path) % 10**8:08d}.png"
    if not out.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        open_image(path).save(out)
    return str(out)


# ----------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, choices=sorted(LOADERS))
    p.add_argument("--root", required=True, help="the dataset folder in its official layout")
    p.add_argument("--split", default=None, help="train / validate / test (dataset-specific)")
    p.add_argument("--out", required=True, help="output folder: pairs.json, images, report")
    p.add_argument("--limit", type=int, default=0, help="use only the first N examples")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out: examples already done (its "
        "prepare_progress.jsonl) are skipped, not sent to the model or the editor again",
    )
    g = p.add_argument_group("model (greedy answers = y-)")
    g.add_argument("--model", help="HF id/dir or tiny-* (fgpo.models.load_model)")
    g.add_argument("--adapter", help="a PEFT adapter folder to load on top of --model")
    g.add_argument("--answers", help="JSON list of {id, qid, answer} instead of a model")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 (160 for reports)")
    g.add_argument("--dtype", default="float32")
    g = p.add_argument_group("editor")
    g.add_argument("--editor", choices=("reference", "llm"), default="reference")
    g.add_argument("--llm-base-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    g.add_argument("--llm-model", help="model name sent to the endpoint")
    g.add_argument(
        "--llm-api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the key ('' = no key)",
    )
    g.add_argument("--llm-timeout", type=float, default=60.0)
    g.add_argument("--llm-retries", type=int, default=2)
    g = p.add_argument_group("lesion corruption")
    g.add_argument("--corrupt-mode", choices=(*MODES, "none"), default="noise")
    g.add_argument("--noise-std", type=float, default=45.0)
    g.add_argument("--fallback", choices=("noise", "blur", "skip"), default="noise")
    g.add_argument("--fallback-std", type=float, default=12.0)
    g.add_argument(
        "--segmenter",
        help="module:function for examples without a lesion annotation: fgpo imports that "
        "module and runs fn(image, example) -> mask, with your permissions (name only code "
        "you trust)",
    )


class PrepareError(RuntimeError):
    """An input of ``fgpo prepare`` does not cover the dataset (e.g. an answer is missing)."""


def _answers_from_file(path: str) -> AnswerFn:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    table = {(str(r["id"]), str(r.get("qid", ""))): str(r["answer"]) for r in rows}

    def answer(ex: VQAExample) -> str:
        key = (ex.id, ex.qid)
        if key not in table:
            raise PrepareError(f"--answers {path} has no answer for id={ex.id} qid={ex.qid}")
        return table[key]

    return answer


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if bool(args.model) == bool(args.answers):
        raise SystemExit("fgpo prepare: give exactly one of --model or --answers")
    examples, report = load_dataset(args.dataset, args.root, args.split)
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise SystemExit(f"fgpo prepare: no usable examples ({report.summary()})")
    if args.editor == "llm":
        if not (args.llm_base_url and args.llm_model):
            raise SystemExit("fgpo prepare: --editor llm needs --llm-base-url and --llm-model")
        editor: Editor = LLMEditor(
            args.llm_base_url,
            args.llm_model,
            api_key_env=args.llm_api_key_env or None,
            timeout=args.llm_timeout,
            max_retries=args.llm_retries,
        )
    else:
        editor = ReferenceEditor.from_examples(examples)
    cfg = None
    if args.corrupt_mode != "none":
        cfg = CorruptConfig(
            mode=args.corrupt_mode,
            noise_std=args.noise_std,
            fallback=args.fallback,
            fallback_std=args.fallback_std,
            segmenter=load_segmenter(args.segmenter) if args.segmenter else None,
        )
    if args.answers:
        answer_fn = _answers_from_file(args.answers)
    else:
        from ..models.inference import default_max_new_tokens, greedy_answer_fn, load_for_inference

        model, proc, device = load_for_inference(args.model, dtype=args.dtype, adapter=args.adapter)
        max_new = args.max_new_tokens or default_max_new_tokens(args.dataset)
        answer_fn = greedy_answer_fn(model, proc, device, max_new_tokens=max_new)
    out = Path(args.out)
    try:
        journal = PairJournal(out, resume=args.resume)
    except FileExistsError as e:
        raise SystemExit(f"fgpo prepare: {e}") from None
    if journal.resumed:
        log.info("resuming: %d examples of %s are done already", journal.resumed, out)
    t0 = time.perf_counter()
    error: BaseException | None = None
    try:
        prepare_pairs(examples, answer_fn, editor, cfg, out, journal=journal)
    except BaseException as e:  # Ctrl-C too: whatever was done is written out below
        error = e
    finally:
        summary = {
            "dataset": report.to_dict(),
            "complete": error is None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if error is not None:
            summary["error"] = f"{type(error).__name__}: {error}"
        path = journal.finish(summary)
        journal.close()
    if error is not None:
        saved = (
            f"{len(journal.records)} pairs from {journal.stats['examples']} examples are "
            f"saved in {path} (progress: {journal.path}); fix the cause and rerun with --resume "
            "to continue"
        )
        if isinstance(error, (LLMEditorError, PrepareError, OSError)):
            what = "the LLM editor failed: " if isinstance(error, LLMEditorError) else ""
            raise SystemExit(f"fgpo prepare: {what}{error}. {saved}") from error
        log.error("%s", saved)
        raise error
    print(f"{report.summary()}")
    counts = dict(sorted(journal.stats.items()))
    print(f"wrote {len(journal.records)} pairs to {path}; counts: {counts}")
    return 0
