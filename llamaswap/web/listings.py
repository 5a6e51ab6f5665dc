"""The ``/v1/models`` records: local models, their aliases, peers' models,
selectors and the active profile's pins, in llama-swap's shape."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llamaswap.config.model import Config
from llamaswap.core.secrets import shown_command
from llamaswap.supervision.process import ProcessState
from llamaswap.supervision.selection import profile_model_records, selector_model_records
from llamaswap.upstream.peerhealth import PeerHealth
from llamaswap.upstream.peers import peer_model_records

if TYPE_CHECKING:
    from llamaswap.web.routing import RoutingState

#: Metadata keys that the ``capabilities`` fields replace in a record.
CAPABILITY_KEYS = ("architecture", "capabilities", "supported_parameters", "context_length")
#: Process states listed as ``unloaded``.
_UNLOADED = (ProcessState.STOPPED, ProcessState.SHUTDOWN)


def running_command(config: Config, model_id: str) -> str:
    """A model's ``cmd`` as ``/running`` shows it: one line, secrets masked."""
    return shown_command(config.models[model_id].cmd, config.known_secrets())


def capability_fields(raw: Any) -> tuple[dict[str, Any], int]:
    """``/v1/models`` fields for a model's ``capabilities``, as llama-swap
    shows them, and the context length for ``meta.n_ctx``."""
    if not isinstance(raw, Mapping):
        return {}, 0
    inputs = [str(v) for v in raw.get("in") or []]
    outputs = [str(v) for v in raw.get("out") or []]
    tools = raw.get("tools") is True
    reranker = raw.get("reranker") is True
    context = raw.get("context")
    if not isinstance(context, int):
        context = 0
    fields: dict[str, Any] = {}
    if inputs or outputs:
        architecture: dict[str, Any] = {"input_modalities": inputs, "output_modalities": outputs}
        if inputs and outputs:
            architecture["modality"] = "+".join(inputs) + "->" + "+".join(outputs)
        fields["architecture"] = architecture
    if inputs or outputs or tools or reranker:
        fields["capabilities"] = {
            "vision": "image" in inputs,
            "audio_transcriptions": "audio" in inputs and "text" in outputs,
            "audio_speech": "text" in inputs and "audio" in outputs,
            "image_generation": "text" in inputs and "image" in outputs,
            "image_to_image": "image" in inputs and "image" in outputs,
            "function_calling": tools,
            "reranker": reranker,
        }
    if tools:
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if context > 0:
        fields["context_length"] = context
    return fields, max(context, 0)


def model_records(
    state: RoutingState, state_of: Callable[[str], str], health: PeerHealth | None = None
) -> list[dict[str, Any]]:
    """Every ``/v1/models`` record under ``state``, sorted by id; ``state_of``
    names a model's process state (which local models are loaded), ``health``
    what is known of the peers."""
    created = int(time.time())
    records = []
    for model_id, model in state.config.models.items():
        if model.unlisted:
            continue
        record = _model_record(state, model_id, created)
        current = state_of(model_id)
        loaded = current not in _UNLOADED
        record["status"] = {
            "value": "sleeping" if current == "sleeping" else "loaded" if loaded else "unloaded"
        }
        records.append(record)
        if state.aliases_listed:
            records += _alias_records(record, model_id, model.aliases, model.metadata)
    records += peer_model_records(state.peers, created, health)
    records += selector_model_records(state.profiles, state_of, created)
    records += profile_model_records(state.profiles, state.profile_state, created)
    records.sort(key=lambda r: r["id"])
    return records


def _model_record(state: RoutingState, model_id: str, created: int) -> dict[str, Any]:
    model = state.config.models[model_id]
    record: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "llama-swap",
    }
    if model.name.strip():
        record["name"] = model.name.strip()
    if model.description.strip():
        record["description"] = model.description.strip()
    internal: dict[str, Any] = {"type": "model"}
    if model.aliases:
        internal["aliases"] = list(model.aliases)
    user = dict(model.metadata)
    fields, n_ctx = state.capabilities.get(model_id, ({}, 0))
    if fields:
        for key in CAPABILITY_KEYS:
            user.pop(key, None)
        record.update(fields)
    record["meta"] = {"llamaswap": {**user, **internal}}
    if n_ctx:
        record["meta"]["n_ctx"] = n_ctx
    return record


def _alias_records(
    record: dict[str, Any],
    model_id: str,
    aliases: tuple[str, ...] | list[str],
    metadata: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """A copy of ``record`` per non-blank alias, marked as an alias of ``model_id``."""
    records = []
    for alias in aliases:
        if alias.strip():
            alias_record = dict(record, id=alias)
            alias_record["meta"] = {
                "llamaswap": {**dict(metadata), "type": "alias", "modelID": model_id}
            }
            records.append(alias_record)
    return records
