"""CPT's data preparation on a corpus of gigabytes, side by side with the tokenizer alone, in one run.

    python benchmarks/corpus_scale.py --size-mb 1024 [--workdir DIR] [--tokenizer DIR] [--keep]

Generates --size-mb MB of JSON lines ({"text": ...}) from the demo's text: the paragraphs of data/cpt and
data/pretrain drawn with a seeded generator into documents of 2-8 paragraphs (a corpus already in --workdir is
reused). Then, each in its own process (each peak RSS is that process's own) and both at once (on a shared machine
both see the same neighbours):

1. the tokenizer alone: the file read line by line, json-decoded, the fast tokenizer called on 256 documents at a
   time (the call TokenizedCorpus makes), the ids dropped: the throughput the preparation should reach;
2. CPT's data preparation as the stage does it, phase by phase: validation (run.validate's check_cpt_documents;
   datasets converts the JSON lines to Arrow files once, then every document is read in batches), the cache key
   (fingerprint_documents: a hash of every document), tokenization into the memory-mapped token file
   (TokenizedCorpus over corpus_documents, as train_cpt), and the first packing (PackedEpochs).

Prints per phase the wall and CPU seconds, MB/s and tokens/s (per CPU second: on a shared machine the wall time
measures the neighbours), the process's peak RSS so far, and within the phase the peak anonymous memory and the
peak of memory-mapped file pages resident (MemoryPeaks), and the ratio of the preparation's tokenization to the tokenizer
alone. The tokenizer is the demo model's (byte-level BPE, 4,000 tokens, trained here in seconds
as pipeline.demo_model trains it) unless --tokenizer names a checkpoint directory. Needs about 3.5x --size-mb of
disk in --workdir (the corpus, datasets' Arrow copy, the token file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402,F401  (offline environment)

BATCH = 256  # documents per tokenizer call, as TokenizedCorpus


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class MemoryPeaks:
    """The largest anonymous and file-backed resident memory seen since the last reset, sampled every 50 ms from
    /proc/self/status. The peak RSS counts pages of memory-mapped files (datasets' Arrow files, the token file) as
    resident while they sit in the page cache, though the kernel reclaims them at will: anonymous memory is what the
    process really holds."""

    def __init__(self):
        import threading

        self.anon = self.file = 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) / 1024)
            self.file = max(self.file, int(fields["RssFile"].split()[0]) / 1024)
            time.sleep(0.05)

    def take(self) -> dict:
        time.sleep(0.1)
        out = {"peak_anon_mb": self.anon, "peak_file_mb": self.file}
        self.anon = self.file = 0.0
        return out


PEAKS = None


def generate(path: Path, size_mb: int, seed: int = 0) -> dict:
    """Documents of 2-8 paragraphs of the demo's text, seeded, until the file holds size_mb MB."""
    if path.is_file() and path.stat().st_size >= size_mb * 2**20:  # the same seed wrote the same file
        return {"bytes": path.stat().st_size, "documents": sum(1 for _ in open(path, "rb")), "paragraphs": "reused"}
    paragraphs = []
    for f in sorted((ROOT / "data" / "cpt").glob("*.md")) + [ROOT / "data" / "pretrain" / "public_corpus.txt"]:
        paragraphs += [p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng, target, size, docs = random.Random(seed), size_mb * 2**20, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while size < target:
            line = json.dumps({"text": "\n\n".join(rng.choices(paragraphs, k=rng.randint(2, 8)))},
                              ensure_ascii=False) + "\n"
            out.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
    return {"bytes": size, "documents": docs, "paragraphs": len(paragraphs)}


def load_tokenizer(spec: str | None, workdir: Path):
    if spec:
        from pipeline.core.checkpoints import load_tokenizer as load

        return load(spec)
    saved = workdir / "tokenizer"
    if not saved.is_dir():
        from pipeline.core.config import DemoBuildConfig
        from pipeline.demo_model import charset, read_documents, train_tokenizer

        cfg = DemoBuildConfig()
        paths = lambda xs: [str(ROOT / x) for x in xs]  # noqa: E731
        tok = train_tokenizer(read_documents(paths(cfg.corpus)) + read_documents(paths(cfg.tokenizer_extra_text)),
                              cfg.vocab_size, charset(paths(cfg.tokenizer_charset)))
        tok.save_pretrained(saved)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved)


def clock() -> tuple:
    return time.time(), time.process_time()


def timed(t0: tuple, phase: str = "", **extra) -> dict:
    out = {"seconds": time.time() - t0[0], "cpu": time.process_time() - t0[1], **extra, "peak_rss_mb": peak_rss_mb(),
           **PEAKS.take()}
    if phase:  # as it happens, for a run cut short
        print(f"[{phase}] " + ", ".join(f"{k} {v:,.1f}" for k, v in out.items()), file=sys.stderr, flush=True)
    return out


def tokenizer_alone(corpus: Path, tok) -> dict:
    t0, tokens, docs, batch = clock(), 0, 0, []

    def run(batch):
        return sum(len(ids) for ids in tok(batch, verbose=False)["input_ids"])

    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == BATCH:
                tokens, docs, batch = tokens + run(batch), docs + len(batch), []
                if docs % (BATCH * 400) == 0:
                    timed(t0, "tokenizer alone, so far", tokens=tokens, documents=docs)
    if batch:
        tokens, docs = tokens + run(batch), docs + len(batch)
    return {"tokenize": timed(t0, "tokenizer alone", tokens=tokens, documents=docs)}


def preparation(corpus: Path, tok, workdir: Path) -> dict:
    from pipeline.core.config import DataPath
    from pipeline.core.data import check_cpt_documents, fingerprint_documents, use_datasets_cache
    from pipeline.stages.cpt import PackedEpochs, TokenizedCorpus, corpus_documents

    use_datasets_cache(workdir / ".datasets")  # as run.py: under the stage cache
    out, spec = {}, str(corpus)
    t0 = clock()
    out["validate"] = timed(t0, "preparation: validate", documents=check_cpt_documents(spec))
    t0 = clock()
    fingerprint_documents(spec)
    out["key"] = timed(t0, "preparation: key")
    t0 = clock()
    tokens = TokenizedCorpus(corpus_documents(DataPath(spec), []), tok, path=workdir / "corpus.int32")
    out["tokenize"] = timed(t0, "preparation: tokenize", tokens=tokens.total_tokens, documents=tokens.documents)
    t0 = clock()
    packed = PackedEpochs(tokens, 2048, seed=0, epochs=1)
    for i in range(0, len(packed), max(1, len(packed) // 1000)):  # a thousand blocks across the packing
        packed[i]
    out["pack"] = timed(t0, "preparation: pack", blocks=len(packed))
    return out


def child(args) -> None:
    global PEAKS
    tok = load_tokenizer(args.tokenizer, args.workdir)
    base = peak_rss_mb()
    PEAKS = MemoryPeaks()
    result = tokenizer_alone(args.corpus, tok) if args.child == "alone" else preparation(args.corpus, tok,
                                                                                          args.workdir)
    print(json.dumps({"imports_rss_mb": base, **result}))


def run_children(args, corpus: Path) -> tuple:
    """Both measurements at once, each in its own process: on a shared machine both see the same neighbours."""
    procs = []
    for kind in ("alone", "prepare"):
        cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus), "--workdir", str(args.workdir)]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    results = []
    for kind, proc in zip(("alone", "prepare"), procs):
        out, _ = proc.communicate()
        if proc.returncode:
            sys.exit(f"{kind} failed (its error is above)")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return tuple(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, deleted after")
    p.add_argument("--tokenizer", default=None, help="a checkpoint directory; default: the demo's tokenizer")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--child", choices=("alone", "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    temporary = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="corpus_scale-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        corpus = args.workdir / "corpus.jsonl"
        t0 = time.time()
        made = generate(corpus, args.size_mb)
        load_tokenizer(args.tokenizer, args.workdir)  # the demo's is trained once, here, before either child starts
        mb = made["bytes"] / 2**20
        print(f"corpus: {mb:.0f} MB, {made['documents']:,} documents (paragraphs of the demo: {made['paragraphs']}) "
              f"({time.time() - t0:.0f} s to write)", flush=True)
        alone, prep = run_children(args, corpus)
        print(f"\n{'':24} {'wall s':>8} {'CPU s':>8} {'MB/CPU s':>9} {'tokens/CPU s':>13} {'peak RSS':>10} "
              f"{'of it anonymous':>16} {'mapped files':>13}")
        rows = [("tokenizer alone", alone["tokenize"])] + \
               [(f"preparation: {k}", v) for k, v in prep.items() if isinstance(v, dict)]
        for name, r in rows:
            tps = f"{r['tokens'] / r['cpu']:,.0f}" if "tokens" in r else "-"
            print(f"{name:24} {r['seconds']:8.1f} {r['cpu']:8.1f} {mb / r['cpu']:9.2f} {tps:>13} "
                  f"{r['peak_rss_mb']:7.0f} MB {r['peak_anon_mb']:13.0f} MB {r['peak_file_mb']:10.0f} MB")
        phases = [v for v in prep.values() if isinstance(v, dict)]
        a, t = alone["tokenize"], prep["tokenize"]
        print(f"\npeak RSS after imports and the tokenizer: {alone['imports_rss_mb']:.0f} MB (tokenizer run), "
              f"{prep['imports_rss_mb']:.0f} MB (preparation run)")
        print(f"tokens: {t['tokens']:,} ({made['bytes'] / t['tokens']:.2f} bytes a token; token file "
              f"{t['tokens'] * 4 / 2**20:,.0f} MB)")
        print(f"tokenization in the preparation vs the tokenizer alone: "
              f"{(t['tokens'] / t['cpu']) / (a['tokens'] / a['cpu']):.2f}x the throughput (per CPU second)")
        print(f"whole preparation (validate + key + tokenize + pack) vs the tokenizer alone: "
              f"{a['cpu'] / sum(v['cpu'] for v in phases):.2f}x ({sum(v['cpu'] for v in phases):.0f} vs "
              f"{a['cpu']:.0f} CPU s; wall {sum(v['seconds'] for v in phases):.0f} vs {a['seconds']:.0f} s)")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
