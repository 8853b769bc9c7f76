"""`mtl-edge info`: versions, CPU flags, GPUs and backends of this machine."""

from __future__ import annotations

import contextlib
import json

import typer

from mtl_edge import __version__, sysinfo


def _line(name: str, entry: dict) -> str:
    if entry.get("version"):
        extra = ""
        if "providers" in entry:
            extra = f" (providers: {', '.join(entry['providers'])})"
        if "cuda_available" in entry:
            extra = f" (CUDA {entry['cuda']}, available: {entry['cuda_available']})"
        return f"{name}: {entry['version']}{extra}"
    return f"{name}: not available ({entry['missing_reason']})"


def _builtin_line(entry: dict) -> str:
    if not entry["present"]:
        return "built-in bundle: none in this installation (pass --bundle)"
    if not entry["verified"]:
        return f"built-in bundle: {entry['path']} FAILS verification: {entry['error']}"
    shape = "x".join(str(d) for d in entry["input"][1:])
    text = (
        f"built-in bundle: {entry['name']} ({entry['backbone']}, input {shape}, variants "
        f"{', '.join(entry['variants'])}, model {entry['model_id'][:12]}) at {entry['path']}"
    )
    accuracy = entry.get("accuracy") or {}
    shown = [f"{k} {v['mean']:.1f} +- {v['ci95']:.1f} %" for k, v in accuracy.items()]
    return text + (f"; test accuracy {', '.join(shown)}" if shown else "")


def register(app: typer.Typer, name: str) -> None:
    @app.command(name=name, help="Print versions, CPU model and flags, GPUs and backends.")
    def info(
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        with contextlib.suppress(ImportError):  # the core reads torch's state from the CLI's
            import torch  # noqa: F401
        from mtl_edge.bundles import describe_builtin
        from mtl_edge.signing import signing_available

        data = {"mtl_edge": __version__, **sysinfo.collect()}
        reason = signing_available()
        data["signing"] = {"available": reason is None, "missing_reason": reason}
        data["builtin_bundle"] = describe_builtin()
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        cpu = data["cpu"]
        flags = [f for f, present in cpu["flags"].items() if present]
        lines = [
            f"mtl-edge: {__version__}",
            f"python: {data['python']} on {data['platform']}",
            f"numpy: {data['numpy']}",
            _line("onnxruntime", data["onnxruntime"]),
            _line("tensorrt", data["tensorrt"]),
            _line("torch", data["torch"]),
            "bundle signing: "
            + ("Ed25519 (cryptography)" if reason is None else f"not available ({reason})"),
            f"cpu: {cpu['model']} ({cpu['cores']} usable cores)",
            f"cpu flags: {' '.join(flags) or 'none of ' + ', '.join(sysinfo.INTERESTING_FLAGS)}",
        ]
        lines.append(_builtin_line(data["builtin_bundle"]))
        if data["gpus"]:
            for i, gpu in enumerate(data["gpus"]):
                lines.append(
                    f"gpu {i}: {gpu['name']} (driver {gpu['driver']}, {gpu['memory']}, "
                    f"compute capability {gpu['compute_capability']})"
                )
        else:
            lines.append("gpu: none found")
        typer.echo("\n".join(lines))
