"""A local Feast feature repository for one model: write, apply, materialise, retrieve.

The embedded default of the FeatureStore component: Feast's local provider, the file
offline store (Parquet) and a SQLite online store, all under one folder. The store holds
the entity-scope features of the model's contract only; an event's own fields travel with
the event. Training frames come from point-in-time-correct historical retrieval (labelled
events with their own fields, plus the entity as of each event) and serving reads the
entity's row from the online store, both through the model's feature service, so both paths
read one definition (`loopform.feast_definitions`, derived from the contract). `import feast` costs seconds: it happens only
when a store is first needed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureService, FeatureStore

    from loopform.contract import Contract
    from loopform.spec import FeatureStoreSpec

#: A model's event table (entity-scope features per event): in its folder of the offline store, and in a
#: local repo's data/ folder.
EVENTS_FILE = "events.parquet"
FEATURE_STORE_YAML = """\
project: {project}
provider: local
registry: data/registry.db
offline_store:
  type: file
online_store:
  type: sqlite
  path: data/online.db
entity_key_serialization_version: 3
"""


#: Set by the FeatureStore component on every Feast and pipeline pod: the offline store's folder.
OFFLINE_URI_ENV = "LOOPFORM_FEAST_OFFLINE_URI"


#: The Feast SQL registry's SQLAlchemy URL (with its password): set from a Secret on every pod that reads it.
REGISTRY_URL_ENV = "FEAST_REGISTRY_URL"


def cluster_config(spec: FeatureStoreSpec) -> str:
    """feature_store.yaml of the platform's Feast: the SQL registry, Redis online store, file offline store.

    The FeatureStore component ships it as a ConfigMap; pipeline steps and model services use the same
    text. Feast expands ${VAR} from the environment when it loads it, so the registry URL and the Redis
    connection string (both with passwords) come from Secrets, never from this file.
    """
    import yaml

    config = {
        "project": spec.project,
        "provider": "local",
        "registry": {
            "registry_type": "sql",
            "path": f"${{{REGISTRY_URL_ENV}}}",
            "cache_ttl_seconds": spec.registry.cache_ttl_seconds,
        },
        "offline_store": {"type": spec.offline_store.type},
        "online_store": {"type": "redis", "connection_string": "${REDIS_CONNECTION_STRING}"},
        "entity_key_serialization_version": 3,
    }
    return yaml.safe_dump(config, sort_keys=False)


class FeatureRepo:
    """Feast repository in `workdir` with the Feast definitions of a model's contract.

    By default a self-contained local repo (source table, registry and SQLite online store
    under `workdir`); with `config`, a client of the platform's Feast (see `cluster_config`).
    """

    def __init__(
        self,
        workdir: Path,
        contract: Contract,
        *,
        project: str = "loopform",
        config: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.contract = contract
        self.project = project.replace("-", "_")
        self.service_name = contract.feature_service
        self.config = config
        self._store: FeatureStore | None = None
        self._module: ModuleType | None = None

    @property
    def data_path(self) -> Path:
        """The offline source table (Parquet)."""
        return self.workdir / "data" / EVENTS_FILE

    def write(self, data: pd.DataFrame) -> Path:
        """Write the source table, feature_store.yaml and the model's feature definitions."""
        schema = self.contract
        missing = [c for c in (schema.entity, schema.timestamp, *schema.feature_names) if c not in data.columns]
        if missing:
            raise ValueError(f"feature source lacks column(s) {missing}")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        # Labels stay out of the feature table: they belong to the entity frame of training.
        columns = [c for c in data.columns if c != schema.label]
        data[columns].to_parquet(self.data_path, index=False)
        return self.configure()

    def configure(self) -> Path:
        """Write feature_store.yaml and the model's feature definitions (no data)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.config or FEATURE_STORE_YAML.format(project=self.project)
        (self.workdir / "feature_store.yaml").write_text(config)
        from loopform.feast_definitions import source

        (self.workdir / "features.py").write_text(source(self.contract))
        # `feast apply` imports every .py in the repo: only the definitions belong there.
        (self.workdir / ".feastignore").write_text("data/\n")
        self._store = None
        self._module = None
        return self.workdir

    @property
    def store(self) -> FeatureStore:
        """The FeatureStore over this repository (constructed once: it costs seconds)."""
        if self._store is None:
            from feast import FeatureStore

            if not (self.workdir / "feature_store.yaml").exists():
                if self.config is None:
                    raise FileNotFoundError(f"{self.workdir} is not a feature repository yet: call write() first")
                self.configure()
            self._store = FeatureStore(repo_path=str(self.workdir))
        return self._store

    def definitions(self) -> ModuleType:
        """The repository's features.py, imported under a private name."""
        if self._module is None:
            path = self.workdir / "features.py"
            if not path.exists() and self.config is not None:
                self.configure()
            name = f"_loopform_feature_repo_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import feature definitions from {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            self._module = module
        return self._module

    def _objects(self) -> list[Any]:
        from feast import Entity, FeatureService, FeatureView

        kinds = (Entity, FeatureView, FeatureService)
        return [obj for obj in vars(self.definitions()).values() if isinstance(obj, kinds)]

    def apply(self) -> list[str]:
        """Register the entities, feature views and feature services; names of what was applied."""
        objects = self._objects()
        if not objects:
            raise ValueError(f"{self.workdir / 'features.py'} defines no Feast objects")
        self.store.apply(objects)
        return sorted(obj.name for obj in objects)

    @property
    def feature_service(self) -> FeatureService:
        """The model's feature service (the contract's)."""
        from feast import FeatureService

        services = [obj for obj in self._objects() if isinstance(obj, FeatureService)]
        if self.service_name is not None:
            services = [s for s in services if s.name == self.service_name]
        if len(services) != 1:
            names = [s.name for s in services]
            raise ValueError(
                f"expected one feature service{f' named {self.service_name!r}' * bool(self.service_name)}, found {names}"
            )
        return self.store.get_feature_service(services[0].name)

    def materialize(self, end: datetime, start: datetime | None = None) -> None:
        """Load feature rows with event time in [start, end] into the online store (latest per card wins)."""
        start = start or datetime(1970, 1, 2, tzinfo=UTC)
        self.store.materialize(start_date=_utc(start), end_date=_utc(end))

    def training_frame(self, entity_df: pd.DataFrame) -> pd.DataFrame:
        """Each labelled event with the entity's features as of its instant (point-in-time join); extra columns pass.

        entity_df: one row per event: entity id, event time and the event's own fields (the contract's
        `event_features`), plus whatever should pass through (id, label). The entity-scope features
        are the store's to add, so a frame that already carries them is refused.
        Rows come back in event-time order. Feast's file store drops entity rows with no feature row
        inside the view's TTL, so the result may be shorter than the input.
        """
        schema = self.contract
        missing = [c for c in (schema.entity, schema.timestamp, *schema.event_features) if c not in entity_df]
        if missing:
            raise ValueError(
                f"the entity frame lacks {missing}: each event carries its own fields, "
                "the feature store adds only the entity's features as of the event"
            )
        stored = [c for c in self.stored_features() if c in entity_df.columns]
        if stored:
            raise ValueError(
                f"the entity frame carries {stored}: those come from the feature store's point-in-time join"
            )
        frame = self.store.get_historical_features(entity_df=entity_df, features=self.feature_service).to_df()
        keys = [c for c in (schema.timestamp, schema.entity, schema.id) if c in frame.columns]
        return frame.sort_values(keys, kind="stable").reset_index(drop=True)

    def stored_features(self) -> list[str]:
        """Names of the features the feature service reads from the store, in its order."""
        return [f.name for projection in self.feature_service.feature_view_projections for f in projection.features]

    def online(self, entity_ids: Iterable[int], *, with_time: bool = False) -> pd.DataFrame:
        """The entity features of each entity's latest row in the online store, in the order asked (unknown: nulls).

        with_time: add `AS_OF`, the event time of the row served (tz-aware UTC; NaT for an unknown entity).
        """
        import pandas as pd
        from feast.types import Int32, Int64

        rows = [{self.contract.entity: int(entity)} for entity in entity_ids]
        response = self.store.get_online_features(features=self.feature_service, entity_rows=rows)
        frame = response.to_df(include_event_timestamps=with_time)
        # Integer features stay integers next to an unknown card's nulls (as in the offline store).
        for projection in self.feature_service.feature_view_projections:
            for feature in projection.features:
                if feature.dtype in (Int32, Int64) and feature.name in frame.columns:
                    frame[feature.name] = frame[feature.name].astype("Int64")
        if with_time:
            stamps = [c for c in frame.columns if c.endswith(_TIMESTAMP_SUFFIX)]
            known = frame[self.stored_features()].notna().any(axis=1)
            seconds = frame[stamps].max(axis=1).where(known)
            frame = frame.drop(columns=stamps)
            frame[AS_OF] = pd.to_datetime(seconds, unit="s", utc=True)
        return frame

    def write_online(self, events: pd.DataFrame) -> None:
        """Write the entity features of arriving events to the online store, as a streaming pipeline would.

        Each row (entity id, event time and the entity features computed from the entity's earlier
        events) becomes its entity's current online row, so an entity-path request for that event
        reads exactly what training joins to it. Later rows of an entity replace earlier ones.
        """
        schema = self.contract
        ordered = events.sort_values(schema.timestamp, kind="stable")
        for projection in self.feature_service.feature_view_projections:
            names = [f.name for f in projection.features]
            self.store.write_to_online_store(projection.name, ordered[[schema.entity, schema.timestamp, *names]])


#: Column `FeatureRepo.online(..., with_time=True)` adds: when the entity features served were computed.
AS_OF = "features_as_of"
_TIMESTAMP_SUFFIX = "__ts"


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
