"""``d2moe_next_lines``: pick the true next two lines of a held-out document among four.

Items come from the corpus's test split (never seen in training). An item is a
position inside a paragraph of prose: the context is up to ``CONTEXT_CHARS``
characters of the document before it (cut at a line start, ending with a prose
line), the answer is the next ``CONTINUATION_LINES`` lines, and the three
distractors are runs of as many prose lines, of similar length, from other
test documents. The documents are wrapped at about 72-80 columns, so the
answer finishes the context's sentence and goes on with the paragraph:
choosing it needs the context, not only fluent text. (With one line instead
of two, the tiny reference model scored at chance.)

Written for the lm-eval harness as a ``multiple_choice`` task: a JSON-lines
dataset (``context``, ``choices``, ``label``) and a task YAML that points at it
by absolute path; everything is built locally and deterministically from the
seed. lm-eval scores each choice by its log-likelihood after the context
(``acc``) and per byte (``acc_norm``); chance is 25%.
"""

import json
import random
from pathlib import Path

from vllm_d2moe.reference import corpus

TASK_NAME = "d2moe_next_lines"
NUM_CHOICES = 4
CONTEXT_CHARS = 600
MIN_CONTEXT_CHARS = 200
MAX_ITEMS_PER_DOCUMENT = 4
CONTINUATION_LINES = 2
# A distractor's length is within this many characters of the answer's, so
# length alone does not give the answer away.
LENGTH_SLACK = 20
PROSE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;'()-")

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: "\\n"
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def is_prose_line(line: str) -> bool:
    """A wrapped line of running English text: no indentation (code, literal blocks),
    no markup, at least five words."""
    return (
        30 <= len(line) <= 100
        and line == line.strip()
        and len(line.split()) >= 5
        and all(c in PROSE_CHARS for c in line)
    )


def _candidates(documents: list[corpus.Document]) -> list[tuple[str, int, str, str]]:
    """``(document id, line number, context, continuation)`` for every run of
    ``CONTINUATION_LINES`` prose lines that follows a prose line and enough text."""
    found = []
    for doc in documents:
        lines = doc.text.split("\n")
        offset = 0
        for number, line in enumerate(lines):
            run = lines[number - 1 : number + CONTINUATION_LINES]
            if (
                number
                and offset >= MIN_CONTEXT_CHARS
                and len(run) == CONTINUATION_LINES + 1
                and all(map(is_prose_line, run))
            ):
                before = doc.text[: offset - 1]  # without the newline that ends the previous line
                context = before[-CONTEXT_CHARS:]
                if len(before) > CONTEXT_CHARS:  # start at a line start
                    context = context[context.find("\n") + 1 :]
                found.append((doc.id, number, context.lstrip("\n"), "\n".join(run[1:])))
            offset += len(line) + 1
    return found


def build_items(documents: list[corpus.Document], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    candidates = _candidates(documents)
    rng.shuffle(candidates)
    items, per_document = [], {}
    for doc_id, number, context, line in candidates:
        if len(items) == count:
            break
        if per_document.get(doc_id, 0) == MAX_ITEMS_PER_DOCUMENT:
            continue
        pool = [c[3] for c in candidates if c[0] != doc_id and abs(len(c[3]) - len(line)) <= LENGTH_SLACK]
        distractors = rng.sample(sorted(set(pool)), NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        items.append(
            {
                "id": f"{doc_id}:{number + 1}",
                "context": context,
                "choices": distractors[:label] + [line] + distractors[label:],
                "label": label,
            }
        )
        per_document[doc_id] = per_document.get(doc_id, 0) + 1
    if len(items) < count:
        raise ValueError(f"the split yields only {len(items)} items; asked for {count}")
    return items


def build_task(out_dir: str | Path, count: int = 300, seed: int = 0, corpus_dir: str | Path | None = None) -> Path:
    """Write ``TASK_NAME.jsonl`` and ``TASK_NAME.yaml`` into ``out_dir``; return the YAML's path.

    Pass ``out_dir`` to lm-eval as ``--include_path`` and ``TASK_NAME`` as ``--tasks``.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = corpus.load_documents("test", corpus.ensure_corpus(Path(corpus_dir) if corpus_dir else None))
    data = out_dir / f"{TASK_NAME}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for item in build_items(documents, count, seed):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    task = out_dir / f"{TASK_NAME}.yaml"
    task.write_text(TASK_YAML.format(task=TASK_NAME, data=json.dumps(str(data))))
    return task
