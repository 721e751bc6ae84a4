"""`--where` and `--score` are one SQL expression, nothing more: checked on DuckDB's parse tree. A module of its
own (duckdb only) so the configs can check them without importing the query stage."""

from __future__ import annotations

import json

import duckdb

from kdcore.errors import UserError


def expression(text: str, what: str, con: duckdb.DuckDBPyConnection | None = None) -> str:
    """`text` when it is exactly one SQL expression, so it can stand inside ( ) of a query the tool writes;
    a UserError otherwise. DuckDB's own parser decides: `SELECT (text) AS __x FROM samples` must parse to one
    plain SELECT with one item, from samples, with no WHERE, GROUP BY, set operation, CTE or modifier
    (whatever closes the parenthesis early or comments the rest out changes that shape)."""
    if not text or not text.strip():
        raise UserError(f"{what} is empty")
    probe = f"SELECT ({text}) AS __x FROM samples"
    con = con or duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    tree = json.loads(con.execute("SELECT json_serialize_sql(?::VARCHAR)", [probe]).fetchall()[0][0])
    if tree.get("error"):
        raise UserError(f"{what} is not a valid SQL expression: {tree.get('error_message', '').splitlines()[0]}")
    statements = tree.get("statements", [])
    node = statements[0]["node"] if len(statements) == 1 else {}
    table = node.get("from_table") or {}
    plain = (
        node.get("type") == "SELECT_NODE"
        and len(node.get("select_list", [])) == 1
        and table.get("type") == "BASE_TABLE"
        and table.get("table_name") == "samples"
        and not table.get("alias")
        and not any(
            node.get(k)
            for k in ("where_clause", "group_expressions", "having", "qualify", "modifiers", "sample", "group_sets")
        )
        and not (node.get("cte_map") or {}).get("map")
    )
    if not plain:
        raise UserError(f"{what} must be one SQL expression over the samples' columns (e.g. \"energy > 3\"); "
                        f"{text!r} is not")  # fmt: skip
    return text
