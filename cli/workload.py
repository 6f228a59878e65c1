"""`cdc workload`: the demo workload on the local clusters (local_stack.workload owns it)."""

from __future__ import annotations

import click

from cli.common import mappings
from local_stack.stack import LocalStack
from local_stack.workload import run_on_stack


@click.command("workload")
@click.option(
    "--rate", type=float, default=100.0, show_default=True, help="Changed rows per second, in total."
)
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds to run.")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable); default all.")
@click.option("--seed", type=int, default=None, help="Random seed for a repeatable workload.")
def command(rate: float, duration: float, clusters: tuple[str, ...], seed: int | None) -> None:
    """Create the demo schemas if needed and drive inserts, updates and deletes across the local clusters."""
    try:
        report = run_on_stack(LocalStack(mappings()), rate, duration, clusters, seed)
    except (ValueError, ConnectionError) as exc:
        raise click.ClickException(str(exc)) from exc
    ops = ", ".join(f"{op} {n}" for op, n in sorted(report.changes.items()))
    click.echo(
        f"workload: {report.total} changes in {report.seconds:.1f} s ({report.total / max(report.seconds, 1e-9):.0f}/s) "
        f"across {len(report.per_cluster)} clusters: {ops}"
    )
