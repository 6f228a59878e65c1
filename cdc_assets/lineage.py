"""The lineage the Dagster UI shows, built from the mappings: per mapped table `mysql/<cluster>/<schema>/<table>`
(external) -> `s3_landing/<cluster>/<schema>/<table>` (external) -> `bigquery/<dataset>/<table>` (materialized by
the loader), grouped per cluster. Owns the asset keys of all three."""

from __future__ import annotations

import dagster as dg

from cdc.mappings import ClusterMapping, Mappings, TableMapping


def source_asset_key(cluster: ClusterMapping, table: TableMapping) -> dg.AssetKey:
    return dg.AssetKey(["mysql", cluster.cluster, table.source_schema, table.source_table])


def landing_asset_key(cluster: ClusterMapping, table: TableMapping) -> dg.AssetKey:
    return dg.AssetKey(["s3_landing", cluster.cluster, table.source_schema, table.source_table])


def bigquery_asset_key(table: TableMapping) -> dg.AssetKey:
    return dg.AssetKey(["bigquery", table.target_dataset, table.target_table])


def source_asset_specs(mappings: Mappings) -> list[dg.AssetSpec]:
    """One external asset per mapped MySQL table: the upstream end of the lineage."""
    return [
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
                "mapping_file": dg.MetadataValue.path(str(mappings.directory / f"{cluster.cluster}.json")),
            },
            tags={"cdc/cluster": cluster.cluster},
        )
        for cluster, table in mappings.tables()
    ]


def landing_asset_specs(mappings: Mappings) -> list[dg.AssetSpec]:
    """One external asset per mapped table: its Parquet files in the landing bucket."""
    return [
        dg.AssetSpec(
            key=landing_asset_key(cluster, table),
            deps=[source_asset_key(cluster, table)],
            description=f"Parquet change files of {table.source} in the landing bucket (DMS layout).",
            group_name=cluster.cluster,
            kinds={"s3", "parquet"},
        )
        for cluster, table in mappings.tables()
    ]
