"""The deployer's metrics, read from its state at scrape time (nothing to keep in step)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.metrics_server import with_process_metrics
from streams.rollout.deployer import Deployer
from streams.routing.registry import STATUSES


class DeployerCollector(Collector):
    def __init__(self, deployer: Deployer) -> None:
        self.deployer = deployer

    def collect(self) -> Iterator[Metric]:
        records = list(self.deployer._mine.values())
        model = self.deployer.model
        by_status = GaugeMetricFamily("ferry_deployer_deployments",
                                      "This deployer's deployments, by status",
                                      labels=["model", "status"])
        for status in STATUSES:
            by_status.add_metric([model, status], sum(r.status == status for r in records))
        yield by_status
        info = GaugeMetricFamily("ferry_deployment_status",
                                 "1 for each live deployment's current status",
                                 labels=["deployment", "status"])
        restarts = GaugeMetricFamily("ferry_deployer_replica_restarts",
                                     "Restarts of a deployment's replicas (local launcher)",
                                     labels=["deployment"])
        for r in records:
            if r.status != "retired":
                info.add_metric([r.deployment, r.status], 1)
                restarts.add_metric([r.deployment], self.deployer.launcher.restarts(r.deployment))
        yield info
        yield restarts

    def describe(self) -> Iterable[Metric]:
        return []


def deployer_registry(deployer: Deployer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DeployerCollector(deployer))
    return with_process_metrics(registry)
