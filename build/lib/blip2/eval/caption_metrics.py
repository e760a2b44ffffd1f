"""Caption metrics as the COCO caption evaluation reports them (pycocoevalcap).

Captions are lowercased and tokenised by the Stanford PTB tokenizer bundled with pycocoevalcap,
and punctuation tokens dropped; then BLEU-1..4, ROUGE-L and CIDEr (the CIDEr-D variant that
pycocoevalcap calls "CIDEr") run in Python, and METEOR 1.5 and SPICE in Java. Scores are returned
as pycocoevalcap computes them: fractions, so a CIDEr of 1.5 is what papers print as 150.

Java runs only as short-lived subprocesses with a time limit, always killed on the way out.
Without Java, tokenisation falls back to :func:`simple_tokenize` (an approximation of PTB) and
METEOR and SPICE are skipped with a :class:`MetricSkippedWarning`. SPICE also needs Stanford
CoreNLP 3.6.0 in pycocoevalcap's ``spice/lib`` (pycocoevalcap would download it; this module never
does): without it SPICE is skipped with a warning.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path

import pycocoevalcap
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from blip2.errors import InputError

METRIC_FAMILIES = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
PACKAGE_DIR = Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __file__
PTB_JAR = PACKAGE_DIR / "tokenizer" / "stanford-corenlp-3.4.1.jar"
METEOR_JAR = PACKAGE_DIR / "meteor" / "meteor-1.5.jar"
SPICE_JAR = PACKAGE_DIR / "spice" / "spice-1.0.jar"
SPICE_CORENLP_JARS = (PACKAGE_DIR / "spice" / "lib" / "stanford-corenlp-3.6.0.jar",
                      PACKAGE_DIR / "spice" / "lib" / "stanford-corenlp-3.6.0-models.jar")
DEFAULT_JAVA_TIMEOUT_S = 600.0

_PUNCTUATION_TOKENS = frozenset(PUNCTUATIONS)
_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_SIMPLE_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.,/&']\w+)*")


class MetricSkippedWarning(UserWarning):
    """A caption metric (or the PTB tokenizer) could not run here and was skipped or replaced."""


def find_java() -> str | None:
    """Path of the ``java`` executable on PATH, or None."""
    return shutil.which("java")


def _one_line(caption: str) -> str:
    """The caption on a single line (the Java tools read one caption per line)."""
    return " ".join(caption.splitlines())


def _drop_punctuation(tokenized_line: str) -> str:
    return " ".join(token for token in tokenized_line.split() if token not in _PUNCTUATION_TOKENS)


def ptb_tokenize(captions: Sequence[str], java: str, timeout_s: float = DEFAULT_JAVA_TIMEOUT_S) -> list[str]:
    """Lowercase + Stanford PTB tokenisation, punctuation tokens dropped: as the COCO evaluation does."""
    if not captions:
        return []
    text = "".join(_one_line(caption) + "\n" for caption in captions)
    command = [java, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    try:
        done = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"the PTB tokenizer ({PTB_JAR.name}) ran past {timeout_s} s on {len(captions)} "
                           f"captions; raise java_timeout_s") from error
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer ({' '.join(command)}) failed with exit code {done.returncode}: "
                           f"{done.stderr.decode('utf-8', 'replace')[-2000:]}")
    lines = done.stdout.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(captions):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [_drop_punctuation(line) for line in lines]


def simple_tokenize(caption: str) -> str:
    """A Java-free approximation of :func:`ptb_tokenize` for one caption.

    Lowercases, splits off the clitics "n't" and "'s/'re/'ve/'ll/'d/'m" as PTB does ("don't" ->
    "do n't"), keeps words joined by - . , / & ' ("black-and-white", "1,000"), drops all other
    punctuation. Differs from PTB on abbreviations ("u.s." -> "u.s") and brackets (PTB keeps
    "-lrb-"/"-rrb-" tokens, which the COCO punctuation filter misses).
    """
    split_clitics = _CLITIC.sub(r" \1", _one_line(caption).lower())
    return _drop_punctuation(" ".join(_SIMPLE_TOKEN.findall(split_clitics)))


class _LineProcess:
    """A subprocess spoken to line by line over stdin/stdout, killed by a watchdog after timeout_s."""

    def __init__(self, command: list[str], cwd: Path, timeout_s: float, name: str):
        self.name, self.timeout_s = name, timeout_s
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr)
        self._timed_out = threading.Event()
        self._watchdog = threading.Timer(timeout_s, self._kill_on_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _kill_on_timeout(self) -> None:
        self._timed_out.set()
        self._process.kill()

    def send(self, line: str) -> None:
        try:
            self._process.stdin.write(line.encode("utf-8") + b"\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise self._failure() from error

    def receive(self) -> str:
        line = self._process.stdout.readline()
        if not line:
            raise self._failure()
        return line.decode("utf-8", "replace").strip()

    def _failure(self) -> RuntimeError:
        if self._timed_out.is_set():
            return RuntimeError(f"{self.name} ran past {self.timeout_s} s and was killed; raise java_timeout_s")
        self._process.wait()
        self._stderr.seek(0)
        log = self._stderr.read().decode("utf-8", "replace")[-2000:]
        return RuntimeError(f"{self.name} exited with code {self._process.returncode}: {log}")

    def close(self) -> None:
        self._watchdog.cancel()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._stderr):
            stream.close()

    def __enter__(self) -> _LineProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _meteor_segment(text: str) -> str:
    return text.replace("|||", "").replace("  ", " ")


def meteor_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]], java: str,
                 timeout_s: float = DEFAULT_JAVA_TIMEOUT_S) -> float:
    """Corpus METEOR 1.5 (English, normalised) of tokenised captions, as pycocoevalcap computes it.

    Each hypothesis is matched against its references ("SCORE" lines); the corpus score comes from
    the summed statistics ("EVAL" line), not from averaging sentence scores.
    """
    command = [java, "-jar", "-Xmx2G", METEOR_JAR.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with _LineProcess(command, METEOR_JAR.parent, timeout_s, "METEOR (java)") as meteor:
        statistics = []
        for hypothesis, refs in zip(hypotheses, references, strict=True):
            segments = [_meteor_segment(ref) for ref in refs] + [_meteor_segment(hypothesis)]
            meteor.send(" ||| ".join(["SCORE", *segments]))
            statistics.append(meteor.receive())
        meteor.send(" ||| ".join(["EVAL", *statistics]))
        for _ in statistics:  # one sentence score per hypothesis, then the corpus score
            meteor.receive()
        return float(meteor.receive())


def spice_available() -> bool:
    """Whether the Stanford CoreNLP jars that SPICE needs are in pycocoevalcap's spice/lib."""
    return all(jar.is_file() for jar in SPICE_CORENLP_JARS)


def spice_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]], java: str,
                timeout_s: float = DEFAULT_JAVA_TIMEOUT_S) -> float:
    """Mean SPICE F-score ("All" category) over tokenised captions, as pycocoevalcap computes it."""
    items = [{"image_id": index, "test": hypothesis, "refs": list(refs)}
             for index, (hypothesis, refs) in enumerate(zip(hypotheses, references, strict=True))]
    with tempfile.TemporaryDirectory(prefix="blip2-spice-") as work_dir:
        input_path, output_path = Path(work_dir) / "input.json", Path(work_dir) / "output.json"
        input_path.write_text(json.dumps(items))
        command = [java, "-jar", "-Xmx8G", SPICE_JAR.name, str(input_path), "-out", str(output_path),
                   "-subset", "-silent"]
        try:
            done = subprocess.run(command, cwd=SPICE_JAR.parent, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"SPICE (java) ran past {timeout_s} s; raise java_timeout_s") from error
        if done.returncode != 0:
            raise RuntimeError(f"SPICE (java) failed with exit code {done.returncode}: "
                               f"{done.stderr.decode('utf-8', 'replace')[-2000:]}")
        results = json.loads(output_path.read_text())
    f_scores = [float(item["scores"]["All"]["f"]) for item in results]
    return sum(f_scores) / len(f_scores)


def _check_inputs(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                  metrics: Collection[str]) -> None:
    unknown = sorted(set(metrics) - set(METRIC_FAMILIES))
    if unknown:
        raise InputError(f"unknown caption metrics {unknown}; choose from {METRIC_FAMILIES}")
    missing = [key for key in references if key not in predictions]
    extra = [key for key in predictions if key not in references]
    if missing or extra:
        raise InputError(f"predictions and references must have the same ids: {len(missing)} id(s) without a "
                         f"prediction (e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})")
    if not references:
        raise InputError("evaluate_captions got no captions: references is empty")
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise InputError(f"references[{key!r}] must be a non-empty list of captions, got {refs!r}")
        if not isinstance(predictions[key], str):
            raise InputError(f"predictions[{key!r}] must be a caption string, got {predictions[key]!r}")


def _tokenize_all(captions: list[str], java: str | None, timeout_s: float) -> list[str]:
    if java is not None:
        return ptb_tokenize(captions, java, timeout_s)
    warnings.warn("java was not found on PATH: captions are tokenised by blip2's simple_tokenize instead of the "
                  "Stanford PTB tokenizer, so scores can differ slightly from official COCO numbers; install a "
                  "Java runtime (e.g. `apt-get install default-jre-headless`) for official scores",
                  MetricSkippedWarning, stacklevel=3)
    return [simple_tokenize(caption) for caption in captions]


def evaluate_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                      metrics: Collection[str] = METRIC_FAMILIES,
                      java_timeout_s: float = DEFAULT_JAVA_TIMEOUT_S) -> dict[str, float]:
    """COCO caption metrics of one generated caption per id against that id's reference captions.

    Returns (for the requested ``metrics`` families that can run here) ``Bleu_1``..``Bleu_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr`` and ``SPICE``, as fractions (CIDEr 1.5, not 150). A family
    that cannot run (no Java; SPICE without CoreNLP) is left out with a MetricSkippedWarning.
    Each Java step is limited to ``java_timeout_s`` seconds.
    """
    _check_inputs(predictions, references, metrics)
    java = find_java()
    ids = list(references)
    raw_hypotheses = [predictions[key] for key in ids]
    raw_references = [list(references[key]) for key in ids]
    flat_tokens = _tokenize_all(raw_hypotheses + [ref for refs in raw_references for ref in refs], java,
                                java_timeout_s)
    hypotheses, cursor, tokenized_references = flat_tokens[:len(ids)], len(ids), []
    for refs in raw_references:
        tokenized_references.append(flat_tokens[cursor:cursor + len(refs)])
        cursor += len(refs)
    # pycocoevalcap's scorer format: index -> [hypothesis] and index -> [references]
    res = {index: [hypothesis] for index, hypothesis in enumerate(hypotheses)}
    gts = dict(enumerate(tokenized_references))

    scores: dict[str, float] = {}
    if "Bleu" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)})
    if "METEOR" in metrics:
        if java is None:
            warnings.warn("METEOR skipped: it runs in Java and java was not found on PATH", MetricSkippedWarning,
                          stacklevel=2)
        else:
            scores["METEOR"] = meteor_score(hypotheses, tokenized_references, java, java_timeout_s)
    if "ROUGE_L" in metrics:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics:
        if java is None or not spice_available():
            reason = "java was not found on PATH" if java is None else (
                f"Stanford CoreNLP 3.6.0 is missing: put {SPICE_CORENLP_JARS[0].name} and "
                f"{SPICE_CORENLP_JARS[1].name} in {SPICE_CORENLP_JARS[0].parent}")
            warnings.warn(f"SPICE skipped: {reason}", MetricSkippedWarning, stacklevel=2)
        else:
            scores["SPICE"] = spice_score(hypotheses, tokenized_references, java, java_timeout_s)
    return scores
