"""ComfyUI workflows as an operator writes them: an API-format graph ("Save (API)" in the editor)
and where each request field goes in it (`node_id.input`), checked when the configuration loads
and again against the server's /object_info at first contact (docs/providers.md §9)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Field_ = Literal["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "n",
                 "strength", "sampler", "scheduler", "checkpoint", "image", "mask"]
Graph = dict[str, dict[str, Any]]
# The fields a client chooses: a value the server refuses there is the request's fault, not the config's.
CHOSEN: frozenset[str] = frozenset({"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width",
                                    "height", "n", "strength", "sampler", "scheduler"})

# A1111's sampler names (what A1111 clients such as webuiapi send, "Euler a" by default) as ComfyUI's
# KSampler names, with the scheduler an A1111 name implies; ComfyUI's own names pass as they are.
A1111_SAMPLERS = {
    "euler a": "euler_ancestral", "euler": "euler", "lms": "lms", "heun": "heun", "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral", "dpm++ 2s a": "dpmpp_2s_ancestral", "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde", "dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm fast": "dpm_fast", "dpm adaptive": "dpm_adaptive", "ddim": "ddim", "unipc": "uni_pc", "lcm": "lcm",
}
A1111_SCHEDULERS = {"uniform": "normal", "ddim": "ddim_uniform", "sgm uniform": "sgm_uniform",
                    "kl optimal": "kl_optimal", "align your steps": "align_your_steps"}


def comfy_sampler(name: str) -> tuple[str, str | None]:
    """("DPM++ 2M Karras") → ("dpmpp_2m", "karras"); a name A1111 does not use is passed unchanged."""
    base, _, suffix = name.strip().lower().rpartition(" ")
    if base and suffix in ("karras", "exponential") and base in A1111_SAMPLERS:
        return A1111_SAMPLERS[base], suffix
    return A1111_SAMPLERS.get(name.strip().lower(), name), None


def comfy_scheduler(name: str) -> str | None:
    """A1111's scheduler label or name as ComfyUI's; "Automatic" leaves the workflow's own."""
    key = name.strip().lower()
    if key == "automatic":
        return None
    return A1111_SCHEDULERS.get(key, key.replace(" ", "_"))


class Place(BaseModel):
    """One `node_id.input` of the graph."""

    model_config = ConfigDict(frozen=True)

    node: str
    input: str

    @classmethod
    def parse(cls, text: str) -> Place:
        node, dot, name = text.partition(".")
        if not dot or not node or not name:
            raise ValueError(f"'{text}' is not of the form node_id.input")
        return cls(node=node, input=name)

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    inputs: dict[Field_, list[Place]]
    outputs: list[str] = Field(min_length=1)  # the SaveImage / PreviewImage nodes whose images answer
    graph: Graph = Field(default_factory=dict, exclude=True)  # read from `file` while validating

    @field_validator("inputs", mode="before")
    @classmethod
    def _places(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: [Place.parse(p) for p in (v if isinstance(v, list) else [v])] for k, v in value.items()}

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> Workflow:
        base = Path((info.context or {}).get("base_dir") or ".")
        path = Path(self.file) if Path(self.file).is_absolute() else base / self.file
        try:
            graph = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"cannot read workflow file {self.file}: {exc.strerror}") from None
        except orjson.JSONDecodeError:
            raise ValueError(f"workflow file {self.file} is not JSON") from None
        self.graph = check_graph(graph, self.file)
        for name, places in self.inputs.items():
            for place in places:
                node = self.graph.get(place.node)
                if node is None:
                    raise ValueError(f"inputs.{name}: node {place.node} is not in {self.file}")
                if place.input not in node["inputs"]:
                    raise ValueError(f"inputs.{name}: node {place.node} ({node['class_type']}) has no input "
                                     f"'{place.input}'")
        for output in self.outputs:
            if output not in self.graph:
                raise ValueError(f"outputs: node {output} is not in {self.file}")
        return self

    def filled(self, values: dict[str, Any]) -> Graph:
        """A copy of the graph with each mapped field's value written in; unmapped fields are ignored."""
        graph = copy.deepcopy(self.graph)
        for name, value in values.items():
            for place in self.inputs.get(name, []):  # type: ignore[call-overload]
                graph[place.node]["inputs"][place.input] = value
        return graph

    def mapped(self, name: str) -> bool:
        return name in self.inputs

    def field_at(self, node: str, input_name: str) -> str | None:
        """The request field written into `node.input`, if any."""
        return next((name for name, places in self.inputs.items()
                     if Place(node=node, input=input_name) in places), None)


def check_graph(graph: Any, source: str) -> Graph:
    """An API-format graph: {node_id: {"class_type", "inputs"}} (not the editor's UI format)."""
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise ValueError(f"{source} is the editor's format; export it with \"Save (API)\"")
    if not isinstance(graph, dict) or not graph:
        raise ValueError(f"{source} is not an API-format workflow (an object of nodes)")
    for node_id, node in graph.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)
                and isinstance(node.get("inputs"), dict)):
            raise ValueError(f"{source}: node {node_id} needs a class_type and inputs")
    return graph


def object_info_problems(workflow: Workflow, info: dict[str, Any]) -> list[str]:
    """What the server's /object_info says is missing: node classes, or inputs of them."""
    problems = []
    for places in workflow.inputs.values():
        for place in places:
            node = workflow.graph[place.node]
            known = info.get(node["class_type"])
            if not isinstance(known, dict):
                problems.append(f"node {place.node}: the server has no node class {node['class_type']}")
                continue
            spec = known.get("input", {})
            names = {*spec.get("required", {}), *spec.get("optional", {})}
            if place.input not in names:
                problems.append(f"node {place} ({node['class_type']}): the server's class has no such input")
    kinds = {output: workflow.graph[output]["class_type"] for output in workflow.outputs}
    problems += [f"node {output}: the server has no node class {kind}" for output, kind in kinds.items()
                 if kind not in info]
    return problems
