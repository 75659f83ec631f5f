"""Dataflow Flex Template: built once, launched many times, each launch a run of its own.

Why a Flex Template and not a classic one: a classic template (`--template_location`) freezes the
job graph when it is built, and featurebeam's graph carries the run folder, the run id and the
attempt stamp as constructor arguments of its steps (commits, orphan removal, the final step,
resume's reading of earlier commits). Every launch of a classic template therefore wrote into the
same run folder and took the first launch's files for orphans. Making all of those runtime
ValueProviders would touch most DoFns, and Dask has no side inputs to carry them. A Flex Template
instead runs featurebeam's own launcher in a container at every launch: it decides the run id and
attempt then, prepares the run folder, builds the graph and hands the job to Dataflow; the job's
final step writes run.json and loads BigQuery, so nothing waits on the launcher.

- Build: `python -m pipelines.extract ... --flex_template=gs://B/templates/featurebeam.json
  --sdk_container_image=IMAGE` calls `build`: it checks every flag as a launch would (config,
  extractors, dataset, the graph for Dataflow), then writes the spec: the image (the one the
  repository's Dockerfile builds: it launches and runs the workers), `sdkInfo`, one parameter per
  flag with the flags given here as their `defaultValue` (the stored flags), and
  `defaultEnvironment` (temp and staging locations, the worker image, worker counts and types).
- Launch: Dataflow starts IMAGE, whose `FLEX_TEMPLATE_PYTHON_PY_FILE` (docker/flex_launch.py)
  calls `main`, with the launch parameters as `--name=value` plus Dataflow's own options
  (`--project`, `--region`, `--temp_location`, `--template_location=<where to write the job>`...).
  `launch` reads the stored flags back from the spec named by `--featurebeam_template`, lets the
  launch parameters override them, and runs `pipelines.extract.launch`. `--run_id` and `--mode`
  are launch parameters only: each launch is a new run unless it says `mode=resume,run_id=ID`.

The launch path runs unchanged with any runner (the tests launch with Beam's portable runner
standing in for Dataflow); what only Dataflow can show is in the README (Templates).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from export import metadata
from featurebeam import redact
from featurebeam.errors import ConfigError, FeaturebeamError, OutputError

SPEC_PARAMETER = "featurebeam_template"  # the launch parameter naming the spec (and so its stored flags)
TEMPLATE_NAME = "featurebeam"
DATAFLOW_RUNNER = "DataflowRunner"
# Decided by each launch: stored in a template, they would make every launch the same run.
LAUNCH_ONLY = ("run_id", "mode")
# featurebeam flags a template does not declare: building it, and what only a local launcher uses.
NOT_PARAMETERS = ("help", "flex_template", "progress", "no_report")
# Flags the launch environment supplies (Dataflow's launcher passes them, or the spec's
# defaultEnvironment keeps them): never stored as parameters.
FROM_LAUNCH = ("runner", "project", "region", "template_location", "job_name", "dry_run")
# Beam flags stored in the spec's defaultEnvironment (FlexTemplateRuntimeEnvironment field, type).
ENVIRONMENT = {
    "temp_location": ("tempLocation", str),
    "staging_location": ("stagingLocation", str),
    "sdk_container_image": ("sdkContainerImage", str),
    "service_account_email": ("serviceAccountEmail", str),
    "network": ("network", str),
    "subnetwork": ("subnetwork", str),
    "max_num_workers": ("maxWorkers", int),
    "num_workers": ("numWorkers", int),
    "machine_type": ("machineType", str),
    "worker_machine_type": ("machineType", str),
    "worker_region": ("workerRegion", str),
    "worker_zone": ("workerZone", str),
    "disk_size_gb": ("diskSizeGb", int),
}
# Local files the launcher would need: the image holds featurebeam and its dependencies instead.
PACKAGING = ("setup_file", "requirements_file", "extra_package", "extra_packages")
# featurebeam flags whose values are paths the launcher or the workers open.
PATH_FLAGS = ("dataset", "output", "config", "reuse_from")
_LOG = logging.getLogger("featurebeam")


def parse_flags(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """`--name=value`, `--name value` and bare `--name` as (name, value) pairs, in order (value
    None for a bare flag). Raises ConfigError for anything that is not a flag."""
    argv = list(argv)
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--") or item == "--":
            raise ConfigError(f"unexpected argument {item!r}; every setting is a --name=value flag")
        name, eq, value = item[2:].partition("=")
        if eq:
            pairs.append((name, value))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((name, argv[i + 1]))
            i += 1
        else:
            pairs.append((name, None))
        i += 1
    return pairs


def to_argv(pairs: Sequence[tuple[str, str | None]]) -> list[str]:
    return [f"--{name}" if value is None else f"--{name}={value}" for name, value in pairs]


def _actions() -> dict[str, argparse.Action]:
    """featurebeam's launcher flags by name (pipelines.extract's parser)."""
    from pipelines import extract

    return {a.dest: a for a in extract._parser()._actions if a.option_strings}


def _switches() -> set[str]:
    return {name for name, action in _actions().items() if isinstance(action, argparse._StoreTrueAction)}


def check_cloud_paths(pairs: Sequence[tuple[str, str | None]], *, when: str) -> None:
    """Refuse a local path (or a dataset name, resolved from this machine's configs) in a flag the
    launcher or the workers open: in a Flex Template both run on Google Cloud, with no local disk."""
    for name, value in pairs:
        if name in PATH_FLAGS and value is not None and "://" not in value:
            where = "gs:// or bq:// URI" if name == "dataset" else "gs:// URI"
            raise ConfigError(
                f"--{name}={value} {when} is not a {where}: a Flex Template's launcher and workers run on Google Cloud "
                f"and see no local disk or dataset names; put it in Cloud Storage and pass its gs:// path"
            )


def _stored(pairs: Sequence[tuple[str, str | None]]) -> tuple[list[tuple[str, str | None]], dict[str, Any]]:
    """Split the build's flags into the stored ones (parameters' defaults) and the spec's defaultEnvironment."""
    environment: dict[str, Any] = {}
    stored: list[tuple[str, str | None]] = []
    names = [name for name, _ in pairs]
    for name, value in pairs:
        if name in FROM_LAUNCH or name in NOT_PARAMETERS or name == SPEC_PARAMETER:
            continue
        if name == "mode" and value == "new":  # the default: every launch is a new run anyway
            continue
        if name in LAUNCH_ONLY:
            raise ConfigError(
                f"--{name} is decided by each launch, not stored in a template (stored, every launch would be the "
                f"same run); drop it here and pass it when launching: --parameters={name}=..."
            )
        if name in PACKAGING:
            raise ConfigError(
                f"--{name} names a local file the template's launcher cannot see; the image built from the "
                f"Dockerfile (--sdk_container_image) already holds featurebeam and its dependencies: drop --{name}"
            )
        if name == "experiments" or name == "experiment":
            environment.setdefault("additionalExperiments", []).extend((value or "").split(","))
            continue
        if name in ENVIRONMENT:
            field, kind = ENVIRONMENT[name]
            try:
                environment[field] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--{name}={value!r} must be a {kind.__name__}") from None
            continue
        if names.count(name) > 1:
            raise ConfigError(f"--{name} is given twice; a template parameter holds one value: give it once")
        stored.append((name, value))
    return stored, environment


def _regexes(action: argparse.Action) -> list[str]:
    if isinstance(action, argparse._StoreTrueAction):
        return ["^(true|false)$"]
    if action.choices:
        return ["^(" + "|".join(action.choices) + ")$"]
    if action.type is int:
        return [r"^[0-9]+$"]
    if action.type is float:
        return [r"^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$"]
    return []


def _parameters(stored: Sequence[tuple[str, str | None]], spec_path: str) -> list[dict[str, Any]]:
    """The spec's parameter metadata: every featurebeam flag (with its help), then the other stored
    Beam flags; a stored flag's value is its `defaultValue`."""
    values = dict(stored)
    params = []
    for name, action in _actions().items():
        if name in NOT_PARAMETERS:
            continue
        param: dict[str, Any] = {
            "name": name,
            "label": name.replace("_", " ").capitalize(),
            "helpText": " ".join((action.help or name).split()),
            "isOptional": not (action.required and name not in values),
        }
        regexes = _regexes(action)
        if regexes:
            param["regexes"] = regexes
        if name in values:
            value = values.pop(name)
            param["defaultValue"] = "true" if value is None and isinstance(action, argparse._StoreTrueAction) else value
        params.append(param)
    for name, value in values.items():  # Beam pipeline options given at build
        param = {
            "name": name,
            "label": name.replace("_", " ").capitalize(),
            "helpText": f"Beam pipeline option --{name}, as given when the template was built",
            "isOptional": True,
            "defaultValue": "true" if value is None else value,
        }
        if value is None:
            param["customMetadata"] = {"featurebeam_switch": "true"}  # a bare flag: true -> --name
        params.append(param)
    params.append(
        {
            "name": SPEC_PARAMETER,
            "label": "This template's spec",
            "helpText": "gs:// path of this spec, from which each launch reads the flags stored in it; keep the default",
            "isOptional": False,
            "defaultValue": spec_path,
            "regexes": ["^gs://.+"],
        }
    )
    return params


def launch_command(spec_path: str, *, project: str | None, region: str | None) -> str:
    return (
        "gcloud dataflow flex-template run featurebeam-$(date +%Y%m%d-%H%M%S) "
        f"--template-file-gcs-location={spec_path} --project={project or 'PROJECT'} --region={region or 'REGION'} "
        f"--parameters={SPEC_PARAMETER}={spec_path}"
    )


def build(argv: Sequence[str]) -> str:
    """Check `argv` as a launch would and write the Flex Template spec named by `--flex_template`.

    Returns what to print: where the spec is and the command that launches it. Raises
    ConfigError (one line naming the fix) for a flag a template cannot store.
    """
    import apache_beam as beam

    from pipelines import extract, runners

    pairs = parse_flags(argv)
    given = dict(pairs)
    spec_path = given.get("flex_template") or ""
    if not spec_path.startswith("gs://"):
        raise ConfigError(f"--flex_template={spec_path!r} must be a gs:// path: Dataflow reads a template's spec from Cloud Storage")
    runner = runners.runner_of(argv)
    if runner is not None and DATAFLOW_RUNNER not in runner:
        raise ConfigError(f"a Flex Template runs on Dataflow, but --runner={runner}; drop --runner or pass --runner={DATAFLOW_RUNNER}")
    if "template_location" in given:
        raise ConfigError(extract.CLASSIC_TEMPLATE)
    image = given.get("sdk_container_image")
    if not image:
        raise ConfigError(
            "--flex_template needs --sdk_container_image=IMAGE: the image built from the repository's Dockerfile, which "
            "runs the launcher at each launch and the workers (docker build -t IMAGE . && docker push IMAGE)"
        )
    check_cloud_paths(pairs, when="in a template")
    stored, environment = _stored(pairs)
    # Everything a launch checks, checked now: flags, config, extractors, dataset, and the graph as
    # Dataflow would get it (built and turned into its proto, so every step pickles). Nothing is written.
    check = [(n, v) for n, v in pairs if n not in ("flex_template", "runner")] + [("runner", DATAFLOW_RUNNER)]
    the_plan, _ = extract.resolve_plan(to_argv(check))
    pipeline = beam.Pipeline(options=the_plan.options)
    extract.build(pipeline, the_plan)
    pipeline.to_runner_api()
    spec = {
        "image": image,
        "sdkInfo": {"language": "PYTHON", "version": beam.__version__},
        "metadata": {
            "name": TEMPLATE_NAME,
            "description": "featurebeam: audio features with Apache Beam. Each launch is a new run (its own run id and "
            "folder) unless it passes mode=resume and run_id; the job's last step writes run.json and loads BigQuery.",
            "parameters": _parameters(stored, spec_path),
        },
        "defaultEnvironment": environment,
    }
    try:
        metadata.write_json(spec_path, spec)
    except Exception as exc:
        raise OutputError(f"cannot write {spec_path}: {type(exc).__name__}: {exc}; check the bucket and your credentials") from None
    output = given.get("output", "runs")
    return (
        f"Flex Template written to {spec_path}\n"
        f"  image:   {image} (built from the Dockerfile: docker build -t {image} . && docker push {image})\n"
        f"  launch:  {launch_command(spec_path, project=given.get('project'), region=given.get('region'))}\n"
        f"  runs:    each launch is a new run under {output.rstrip('/')}/{the_plan.dataset.name}/ with its own run id; "
        "add mode=resume,run_id=ID to the parameters to continue one"
    )


def read_spec(spec_path: str) -> dict[str, Any]:
    try:
        spec = metadata.read_json(spec_path)
    except Exception as exc:
        raise OutputError(f"cannot read the template spec {spec_path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(spec, dict) or spec.get("metadata", {}).get("name") != TEMPLATE_NAME:
        raise ConfigError(f"{spec_path} is not a featurebeam Flex Template spec; pass the path --flex_template wrote")
    return spec


def launch_argv(argv: Sequence[str]) -> list[str]:
    """The launcher's flags for one launch: the spec's stored flags, overridden by the launch's."""
    given = [(n, v) for n, v in parse_flags(argv) if v != ""]  # an empty launch parameter means "not given"
    spec_paths = [v for n, v in given if n == SPEC_PARAMETER]
    if not spec_paths or not spec_paths[-1]:
        raise ConfigError(
            f"this launch did not say which template it runs: pass --parameters={SPEC_PARAMETER}=gs://.../featurebeam.json "
            "(the command the template's build printed does)"
        )
    spec = read_spec(spec_paths[-1])
    given = [(n, v) for n, v in given if n != SPEC_PARAMETER]
    switches = _switches()
    stored = []
    for param in spec["metadata"].get("parameters", []):
        if param["name"] == SPEC_PARAMETER or "defaultValue" not in param:
            continue
        if param.get("customMetadata", {}).get("featurebeam_switch"):
            switches.add(param["name"])
        stored.append((param["name"], param["defaultValue"]))
    names = {n for n, _ in given}
    merged = [(n, v) for n, v in stored if n not in names] + given
    environment = spec.get("defaultEnvironment", {})
    by_field = {field: name for name, (field, _) in ENVIRONMENT.items() if name != "worker_machine_type"}
    names = {n for n, _ in merged}
    for field, value in environment.items():
        name = by_field.get(field)
        if name and name not in names:
            merged.append((name, str(value)))
    if "sdk_container_image" not in names and "sdkContainerImage" not in environment:
        merged.append(("sdk_container_image", spec["image"]))
    if environment.get("additionalExperiments") and "experiments" not in names:
        merged.append(("experiments", ",".join(environment["additionalExperiments"])))
    if "runner" not in names:
        merged.append(("runner", DATAFLOW_RUNNER))
    out: list[tuple[str, str | None]] = []
    for name, value in merged:
        if name in switches and value is not None:
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"--{name}={value!r}: a switch takes true or false")
            if value.lower() == "true":
                out.append((name, None))
            continue
        out.append((name, value))
    check_cloud_paths(out, when="in this launch")
    return to_argv(out)


def launch(argv: Sequence[str]):
    """One launch of a featurebeam Flex Template: decide the run now, submit the job, do not wait.

    argv: what Dataflow's Flex Template launcher passes (launch parameters as `--name=value`,
    `--featurebeam_template` among them, and its own options). Returns
    `pipelines.extract.Launched` (the plan and the runner's PipelineResult).
    """
    from pipelines import extract

    return extract.launch(launch_argv(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the image's Flex Template launcher (docker/flex_launch.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    redact.scrub_logs()
    try:
        launch(list(sys.argv[1:] if argv is None else argv))
    except FeaturebeamError as exc:
        print(f"featurebeam: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
