"""`evictkit eval`: the evaluation harness on the command line.

The lead's `evictkit/cli.py` calls `add_parser(subparsers)` and dispatches to `main(args)`;
`python -m evictkit.eval.cli ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from evictkit.eval import distributed
from evictkit.eval.config import EvalConfig
from evictkit.eval.runner import run_eval

DESCRIPTION = """\
Evaluate KV-cache eviction policies side by side on one model: RULER tasks, Needle-in-a-Haystack,
LongBench (from your copy of its data), perplexity and attention-output reconstruction, for every
policy x budget. The prompt's prefill is computed once per sample and shared by every variant.
By default the context is compressed before the question is seen (query-agnostic);
--query-aware puts the question in the prefill.

Writes into --out: results.jsonl (one line per sample x variant), summary.md, summary.csv,
plots/*.png and config.json. Rerunning with the same --out resumes (finished samples are
skipped); a rerun that only adds samples, tasks, policies, budgets or prefill attentions extends
that run (only the new rows run); any other change there is refused unless --force.

Under torchrun (`torchrun --nproc_per_node=N -m evictkit eval ...`, one node or several) the
samples are split over the processes, and rank 0 merges their results into the same files.
--batch-size N runs samples of similar length as left-padded batches of N: faster, same results.
"""

EPILOG = """\\
tasks: ruler:niah_single_1..3, ruler:niah_multikey_1..3, ruler:niah_multivalue,
  ruler:niah_multiquery, ruler:vt, ruler:cwe, ruler:fwe, ruler:qa_1, ruler:qa_2 ('ruler' = all),
  niah (grid of --niah-lengths x --niah-depths), ppl, recon,
  longbench:DATASET (narrativeqa, qasper, multifieldqa_en, multifieldqa_zh, hotpotqa, 2wikimqa,
  musique, dureader, gov_report, qmsum, multi_news, vcsum, trec, triviaqa, samsum, lsht,
  passage_count, passage_retrieval_en, passage_retrieval_zh, lcc, repobench-p; 'longbench' = all),
  longbench:DATASET_e (LongBench-E; 'longbench_e' = all 13). LongBench reads DATASET.jsonl from
  --data DIR (unzip https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip there);
  its prompts are middle-truncated to --length tokens, scored with LongBench's metrics (0-100).
  gen:NAME: long generation over --data DIR/NAME.jsonl (fields question and answer, or
  --gen-fields Q,A; GSM8K's "#### 42" or a \\boxed{} answer), decode-time eviction (phase both,
  --slack N), exact match of the final answer; reports output length and cache size over the
  generation (default --max-new-tokens 512).
examples:
  evictkit eval --model smollm2 --tasks ruler:niah_single_1,ruler:vt,niah \\
      --policies full,streaming_llm,snapkv,restkv --budgets 64,128,256,512 --length 4096 \\
      --samples 10 --out runs/smollm2-4k
  evictkit eval --tasks ruler:qa_1 --policies full,restkv:alpha=0.3,beta=2000 --budgets 0.1,0.25,0.5 --out runs/qa
  evictkit eval --tasks longbench:hotpotqa,longbench:narrativeqa --data ~/LongBench/data --length 7500 \\
      --policies full,snapkv --budgets 256,1024 --samples 20 --out runs/longbench
  evictkit eval --tasks gen:gsm8k --data ~/gsm8k --policies full,streaming_llm,rkv \\
      --budgets 128,256 --samples 20 --max-new-tokens 1024 --out runs/gsm8k
  evictkit eval --tasks ruler:niah_single_1 --policies full,snapkv,restkv --budgets 1024 --length 8000 \\
      --prefill-attention dense,xattention,a_shape:n_local=1024 --query-aware --samples 10 --out runs/sparse
  torchrun --standalone --nproc_per_node=2 -m evictkit eval --tasks ruler:vt --policies full,snapkv \\
      --budgets 256 --samples 8 --out runs/two-processes
"""


def add_parser(subparsers) -> None:
    """Register the `eval` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="evaluate policies on RULER / NIAH / LongBench / perplexity tasks",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _arguments(p)
    p.set_defaults(func=main)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="built-in model name (smollm2, gemma3-270m) or a local HF model directory (default: smollm2)")
    p.add_argument("--tasks", default="ruler:niah_single_1,ruler:niah_single_2,ruler:vt",
                   help="comma-separated tasks (default: ruler:niah_single_1,ruler:niah_single_2,ruler:vt)")
    p.add_argument("--policies", default="full,streaming_llm",
                   help="comma-separated policies, parameters as name:key=value,key=value "
                        "(default: full,streaming_llm)")
    p.add_argument("--budgets", default="64,128,256,512",
                   help="entries kept per layer per KV head (ints), or fractions of the prompt in (0, 1] "
                        "(default: 64,128,256,512)")
    p.add_argument("--length", type=int, default=4096,
                   help="prompt length in tokens of the model's tokenizer, within 2%%; LongBench prompts are "
                        "middle-truncated to it (default: 4096)")
    p.add_argument("--samples", type=int, default=10,
                   help="samples per task (default: 10; niah runs its grid; LongBench: the first N of its file)")
    p.add_argument("--out", required=True, help="output directory (e.g. runs/NAME)")
    p.add_argument("--query-aware", action="store_true",
                   help="put the question in the prefill (default: compress the context first)")
    p.add_argument("--seed", type=int, default=42, help="seed of the task generators (default: 42, RULER's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens (default: the task's own, RULER's or LongBench's)")
    p.add_argument("--niah-lengths", default="", help="NIAH context lengths, comma-separated (default: --length)")
    p.add_argument("--niah-depths", default="",
                   help="NIAH needle depths in %%, comma-separated (default: 0,25,50,75,100)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder of LongBench's per-task JSONL files (the unzipped data.zip), for longbench:* tasks")
    p.add_argument("--gen-fields", default="", metavar="QUESTION,ANSWER",
                   help="the JSONL fields gen:NAME tasks read (default: question,answer)")
    p.add_argument("--slack", type=int, default=0, metavar="N",
                   help="gen:NAME tasks: evict at decode when a layer exceeds budget + N (default 0: every step)")
    p.add_argument("--continuation", type=int, default=256, help="teacher-forced tokens of ppl/recon (default: 256)")
    p.add_argument("--no-chat", action="store_true", help="use the raw prompt, not the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: float32)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="place the model with accelerate: 'auto' (GPUs, then CPU memory, then disk), or a device "
                        "such as 'cuda:0' (default: the CPU; under torchrun with GPUs, cuda:LOCAL_RANK)")
    p.add_argument("--prefill-attention", default="dense", metavar="NAME[,NAME...]",
                   help="prefill attention(s) of the prompt's forward, as in --policies: dense (the model's own, "
                        "the default), a_shape, tri_shape, vertical_slash, xattention or a plugin's, with "
                        "parameters as name:key=value (`evictkit list` shows them). Several, comma-separated "
                        "(dense,xattention), run every policy x budget under each, in one run and one table "
                        "(each row carries its prefill attention and density). The question and the answer "
                        "always run the model's own attention (docs/sparse-prefill.md)")
    p.add_argument("--prefill-params", default="", metavar="JSON",
                   help="parameters of the one non-dense --prefill-attention as a JSON object, e.g. "
                        "'{\"threshold\": 0.9}' (with several sparse methods, give each its own inline)")
    p.add_argument("--no-shared-prefill", action="store_true",
                   help="give every variant its own prefill (slower; same results)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="run samples of similar length N at a time as left-padded batches (the prefill, the "
                        "replay per variant, the question and the decoding batched); same results as 1, the "
                        "default, which runs one sample at a time")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="discard results of a different configuration in --out")


def main(args: argparse.Namespace) -> int:
    """Run `evictkit eval` with parsed arguments; returns the exit status."""
    try:
        config = EvalConfig.from_strings(
            tasks=args.tasks, policies=args.policies, budgets=args.budgets, niah_lengths=args.niah_lengths,
            niah_depths=args.niah_depths, model=args.model, length=args.length, samples=args.samples, seed=args.seed,
            query_aware=args.query_aware, max_new_tokens=args.max_new_tokens, continuation=args.continuation,
            chat=False if args.no_chat else None, dtype=args.dtype, data=args.data,
            gen_fields=args.gen_fields, slack=args.slack, prefill_attention=args.prefill_attention,
            prefill_params=args.prefill_params,
        )
        result = run_eval(config, args.out, force=args.force, command=sys.argv,
                          progress=not args.no_progress, shared_prefill=not args.no_shared_prefill,
                          plots=not args.no_plots, device_map=args.device_map, batch_size=args.batch_size)
    except ValueError as exc:
        print(f"evictkit eval: error: {exc}", file=sys.stderr)
        return 2
    if distributed.from_env().main:  # one line for the run, not one per rank
        print(f"{result['ran']} runs done, {result['skipped']} already there; summary: {result['out']}/summary.md")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` as `evictkit eval`'s arguments and run."""
    parser = argparse.ArgumentParser(prog="evictkit eval", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
