"""What a policy may use beyond `evictkit`'s top level: selection, attention and validation helpers.

Built-in policies import from `evictkit`, this module and other built-in policy modules
(`evictkit.plugins.*`: PyramidKV extends SnapKV, AdaKV reuses PyramidKV's schedule, ReST-KV keeps
its numerics in `_restkv_math`), as a third-party policy imports from `evictkit`, this module and
its own package; none imports the core's other modules (tests/test_contract.py checks it).

- selection: `select_topk` (scores -> sorted kept indices, protected slots forced in, ties to the
  newer slot), `reduce_gqa`, `pool1d`, `RaggedSelection` (per-head counts);
- attention: `attention_weights` (softmax of queries over cached keys, causal by true position),
  `attention_column_sums` (chunked column sums of a whole forward's attention), `project_queries`;
- validators: `int_at_least`, `one_of`, `odd_kernel`, `a_bool` (attrs validators with messages that
  name the parameter, the value and the valid range).
"""

from evictkit.attention import attention_column_sums, attention_weights, project_queries
from evictkit.contract import RaggedSelection
from evictkit.hf import rotary_class
from evictkit.positions import POSITION_MODES
from evictkit.selection import GQA_REDUCTIONS, POOLS, pool1d, reduce_gqa, select_topk
from evictkit.validators import a_bool, int_at_least, odd_kernel, one_of

__all__ = [
    "GQA_REDUCTIONS",
    "POOLS",
    "POSITION_MODES",
    "RaggedSelection",
    "a_bool",
    "attention_column_sums",
    "attention_weights",
    "int_at_least",
    "odd_kernel",
    "one_of",
    "pool1d",
    "project_queries",
    "reduce_gqa",
    "rotary_class",
    "select_topk",
]
