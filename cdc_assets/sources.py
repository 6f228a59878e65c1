"""Source assets: one external asset per mapped MySQL table, grouped per cluster, built from the mappings.

These are the upstream end of the lineage the Dagster UI shows (MySQL source -> S3 landing -> BigQuery).
"""

from __future__ import annotations

import dagster as dg

from cdc.mappings import ClusterMapping, Mappings, TableMapping


def source_asset_key(cluster: ClusterMapping, table: TableMapping) -> dg.AssetKey:
    return dg.AssetKey(["mysql", cluster.cluster, table.source_schema, table.source_table])


def source_asset_specs(mappings: Mappings) -> list[dg.AssetSpec]:
    specs = []
    for cluster, table in mappings.tables():
        specs.append(
            dg.AssetSpec(
                key=source_asset_key(cluster, table),
                description=f"MySQL table {table.source} on cluster {cluster.cluster} (captured from its binlog).",
                group_name=cluster.cluster,
                kinds={"mysql"},
                metadata={
                    "cluster": cluster.cluster,
                    "source": table.source,
                    "target": table.target,
                    "primary_key": ", ".join(table.primary_key) or "(append-only)",
                    "mapping_file": dg.MetadataValue.path(
                        str(mappings.directory / f"{cluster.cluster}.json")
                    ),
                },
                tags={"cdc/cluster": cluster.cluster},
            )
        )
    return specs
