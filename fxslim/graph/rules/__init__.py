"""The op-rule table: how each op couples the channel spaces of its inputs and outputs.

One entry per op, keyed by module type (call_module), function object (call_function)
or ``"method:<name>"`` (call_method). A rule receives the builder, the node and, for
modules, the module and its path; it sets ``b.out[node]`` to the output's spaces (one
per dim, nested lists for tuple outputs) and records members, identities and maps.

An op with no entry is never guessed: the analysis pins every space it touches and the
reason names the op and the module path. Users add entries with `register_rule`.

A layer op has one rule for both of its forms, the module (``nn.Conv2d``) and the
function with parameter operands (``F.conv2d(x, conv.weight, ...)``): `operands` reads
either into the same `LayerOperands`.

Layout: `base` (the Rule type, the table, lookups), `common` (helpers such as
`elementwise`, graph inputs/outputs, unknown ops), `operands` (a layer's operands in
either form), `layers` (convs, linear, norms, embedding, attention), `views` (reshapes,
permutes), `tensor_ops` (concat, split, indexing, pooling, matmul), `table` (the
registrations).
"""

from fxslim.graph.rules.base import (
    RULES,
    SHAPE_QUERIES,
    Rule,
    lookup_rule,
    register_rule,
    rule_of_type,
    sync_of,
)
from fxslim.graph.rules.common import (
    couple_get_attr,
    couple_output,
    couple_placeholder,
    couple_unknown,
    elementwise,
    same_as_input,
)
from fxslim.graph.rules.table import literal_spaces

__all__ = [
    "RULES",
    "SHAPE_QUERIES",
    "Rule",
    "couple_get_attr",
    "couple_output",
    "couple_placeholder",
    "couple_unknown",
    "elementwise",
    "literal_spaces",
    "lookup_rule",
    "register_rule",
    "rule_of_type",
    "same_as_input",
    "sync_of",
]
