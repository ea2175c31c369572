"""The API reference page (/docs), rendered on the node from its OpenAPI schema.

FastAPI's own /docs loads Swagger UI from a CDN, which a hospital network does not reach; this page is
plain HTML with no script and no external asset: each route with its method, parameters and description.
"""

from __future__ import annotations

from html import escape
from typing import Any

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h2{font-size:1.05em;margin:1.4em 0 .3em}code{background:#f3f3f3;padding:0 .3em}
.m{display:inline-block;min-width:4em;font-weight:bold}pre{white-space:pre-wrap;margin:.3em 0 0 4.3em}
ul{margin:.2em 0 0 4.3em}"""


def api_reference(schema: dict[str, Any]) -> str:
    """HTML of every path and method in an OpenAPI 3 `schema` (FastAPI's `app.openapi()`)."""
    info = schema.get("info", {})
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(info.get('title', 'API'))} API"
           f"</title><style>{_STYLE}</style></head><body>",
           f"<h1>{escape(info.get('title', 'API'))} {escape(str(info.get('version', '')))} — API reference</h1>",
           "<p>Send <code>Authorization: Bearer &lt;http.token&gt;</code> when the node has a token. "
           "The machine-readable schema is <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in sorted(schema.get("paths", {}).items()):
        for method, op in methods.items():
            out.append(f"<h2><span class='m'>{escape(method.upper())}</span> <code>{escape(path)}</code></h2>")
            params = op.get("parameters", [])
            if params:
                out.append("<ul>" + "".join(
                    f"<li><code>{escape(p.get('name', ''))}</code> ({escape(p.get('in', ''))}"
                    f"{', required' if p.get('required') else ''})</li>" for p in params) + "</ul>")
            text = op.get("description") or op.get("summary") or ""
            if text:
                out.append(f"<pre>{escape(text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
