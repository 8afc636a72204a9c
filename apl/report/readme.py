"""The report folder's README.md: what was run, on which machine, and what every file is."""
from __future__ import annotations

from apl.report.stamp import Stamp

__all__ = ["render_readme"]


def _machine_lines(manifest: dict | None) -> list[str]:
    if not manifest:
        return ["- no manifest.json next to the runs: machine and command unknown"]
    devices = ", ".join(f"{d.get('device')} ({d.get('name')})" for d in manifest.get("devices", []))
    keys = [("grid command", manifest.get("command")), ("devices", devices),
            ("torch", manifest.get("torch_version")),
            ("torchvision", manifest.get("torchvision_version")),
            ("CUDA", manifest.get("cuda_version")), ("python", manifest.get("python_version")),
            ("platform", manifest.get("platform")), ("git commit", manifest.get("git_commit")),
            ("grid started", manifest.get("started_at")),
            ("grid finished", manifest.get("finished_at") or "not finished")]
    return [f"- {k}: `{v}`" if k == "grid command" else f"- {k}: {v}" for k, v in keys]


def render_readme(files: dict[str, str], records: list[dict], manifest: dict | None, stamp: Stamp,
                  command: str, skipped: list[str]) -> str:
    """The README text: ``files`` maps each written file's name to what it is."""
    expected = len((manifest or {}).get("runs", {})) or None
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in records)
    lines = ["# Reproduction report", "", f"**{stamp.banner}**", "", stamp.data, "",
             f"Report command: `{command}`", "",
             f"Runs found: {len(records)}" + (f" of {expected} planned" if expected else "")
             + f" (total training wall time {wall / 3600:.2f} h, summed over runs).", "",
             "## Machine and grid", ""] + _machine_lines(manifest) + [
             "", "## Files", "", "| file | what it is |", "| --- | --- |"]
    lines += [f"| `{name}` | {what} |" for name, what in sorted(files.items())]
    lines += ["", "## How to read", "",
              "- Table cells are our test accuracy in percent; with several seeds, mean ± "
              "sample standard deviation. Next to each: the published number and Δ = ours − "
              "published. Cells without runs, or without a published number, show —.",
              "- The final-epoch table is the headline (the published numbers are last-epoch "
              "or unspecified); the best-epoch table shows how much late-epoch memorisation "
              "of noisy labels costs.",
              "- " + stamp.ref_line,
              "- CE does not depend on the loss variant: its runs appear in every variant.",
              "- Loss definitions per variant: LOSSES.md at the project root."]
    lines += [f"- Not written: {s}." for s in skipped]
    return "\n".join(lines) + "\n"
