"""Print the module map of a raypress/ tree: lines, imports (all / of raypress modules / inside
functions) per module, and the import cycles. `python scripts/module_map.py [path/to/raypress]`."""
import ast
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "raypress")
rows, totals = [], [0, 0, 0, 0]
for f in sorted(root.rglob("*.py")):
    tree = ast.parse(f.read_text())
    top = {id(n) for n in tree.body}
    imps = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    internal = [n for n in imps if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("raypress"))
                or isinstance(n, ast.Import) and any(a.name.startswith("raypress") for a in n.names)]
    lazy = [n for n in imps if id(n) not in top and not any(id(n) in {id(x) for x in ast.walk(b)} for b in tree.body
                                                              if isinstance(b, (ast.If, ast.Try)))]
    lines = len(f.read_text().splitlines())
    rows.append((str(f.relative_to(root.parent)), lines, len(imps), len(internal), len(lazy)))
    for i, v in enumerate((1, lines, len(imps), len(lazy))):
        totals[i] += v
w = max(len(r[0]) for r in rows)
print(f"{'module':<{w}} {'lines':>6} {'imports':>8} {'raypress':>9} {'in functions':>13}")
for r in rows:
    print(f"{r[0]:<{w}} {r[1]:>6} {r[2]:>8} {r[3]:>9} {r[4]:>13}")
print(f"{'total: ' + str(totals[0]) + ' files':<{w}} {totals[1]:>6} {totals[2]:>8} {'':>9} {totals[3]:>13}")
