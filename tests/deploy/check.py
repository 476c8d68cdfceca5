"""Checks of the deployment files under deploy/, with the validators that
tests/deploy/setup installs (pinned in requirements.txt):

- systemd units: `systemd-analyze verify` (Debian's systemd) and, for the
  replica, `systemd-analyze security --offline` with a threshold;
- Kubernetes: kubernetes-validate, strict (unknown fields are errors), against
  the schemas of one Kubernetes version;
- Nomad: python-hcl2 parses the job files (there is no Nomad in the package
  registries this project uses, so `nomad job validate` is not an option).

On top of the validators, each file is checked for the settings that matter to
airlock (the node's kill mode, privileges, mount propagation, ...), and the
config files embedded in the Kubernetes and Nomad files, and the two shown in
docs/deploy.md, are parsed as TOML and checked for the cluster settings.

Every validator and every policy check is also run on a deliberately broken
copy in a temporary directory, which must fail: a check that cannot fail
proves nothing.

Run by tests/deploy/run; prints `deploy: N passed, M failed` last.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import traceback
from pathlib import Path

import hcl2
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE_VERSION = "1.33.0"
# systemd-analyze security: 0 (tight) to 100 (nothing); the replica scores 15
# on systemd 252. Past this, a hardening line went missing.
REPLICA_EXPOSURE_MAX = 25
BINARY = "/usr/local/bin/airlock"
ADDRESS_POOL = "10.248.0.0/16"
# A node's lease expires within this (the cluster design says 15 s or less): a node agent's
# graceful stop must end well inside it.
LEASE_S = 15


class Failed(Exception):
    pass


def need(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)


def must_fail(check, *args, what: str) -> None:
    """`check(*args)` must raise Failed: the broken copy is caught."""
    try:
        check(*args)
    except Failed:
        return
    raise Failed(f"the check passed a broken copy: {what}")


def seconds(value) -> float:
    """`10`, `"10s"`, `"1min"` (systemd) or `"10s"` (Nomad) as seconds; unset is infinite."""
    if value is None:
        return float("inf")
    m = re.fullmatch(r"\s*(\d+)\s*(s|sec|m|min)?\s*", str(value))
    need(m is not None, f"not a duration: {value!r}")
    return int(m.group(1)) * (60 if m.group(2) in ("m", "min") else 1)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="airlock-deploy-"))


# ---------------------------------------------------------------- systemd

UNITS = ["airlock.service", "airlock-node.service"]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        need(section is not None and "=" in line, f"not a unit file line: {line!r}")
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict, section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def verify_unit(path: Path) -> None:
    """systemd-analyze verify on a copy whose ExecStart binary is a stub (verify
    refuses a unit whose binary does not exist, and no airlock is installed
    here). Warnings (an unknown key, a bad value) do not change its exit code,
    so any diagnostic naming the unit is a failure too."""
    work = tmpdir()
    try:
        stub = work / "bin" / "airlock"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        copy = work / path.name
        copy.write_text(path.read_text().replace(BINARY, str(stub)))
        run = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(copy)],
            capture_output=True,
            text=True,
        )
        said = (run.stdout + run.stderr).strip()
        ours = [l for l in said.splitlines() if path.name in l or str(copy) in l]
        need(run.returncode == 0, f"systemd-analyze verify {path.name}: exit {run.returncode}: {said}")
        need(not ours, f"systemd-analyze verify {path.name}: " + " | ".join(ours))
        if said:
            print(f"    (about other units: {said})")
    finally:
        shutil.rmtree(work)


def check_units_verify():
    for name in UNITS:
        verify_unit(DEPLOY / "systemd" / name)


def check_units_verify_catches_breakage():
    node = (DEPLOY / "systemd" / "airlock-node.service").read_text()
    for what, broken in [
        ("a misspelt kill mode", node.replace("\nKillMode=process\n", "\nKillMode=procss\n")),
        ("an unknown key", node.replace("\nDelegate=yes\n", "\nDelegate=yes\nDelgate=yes\n")),
        ("a relative ExecStart", node.replace(f"ExecStart={BINARY}", "ExecStart=airlock")),
        ("a missing binary", node.replace(BINARY, "/nonexistent/airlock")),
    ]:
        need(broken != node, f"the breakage did not apply: {what}")
        work = tmpdir()
        try:
            copy = work / "airlock-node.service"
            copy.write_text(broken)
            must_fail(verify_unit, copy, what=what)
        finally:
            shutil.rmtree(work)


def exposure_ok(path: Path) -> None:
    run = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={REPLICA_EXPOSURE_MAX}",
            "--no-pager",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout)
    need(level is not None, f"no exposure level from systemd-analyze security: {run.stderr.strip()}")
    need(
        run.returncode == 0,
        f"{path.name}: exposure {level.group(1)} is over {REPLICA_EXPOSURE_MAX / 10}",
    )


def check_replica_hardened():
    unit = DEPLOY / "systemd" / "airlock.service"
    exposure_ok(unit)
    # The same unit with its sandboxing lines taken out must score worse.
    keep = ("User=", "Group=", "Exec", "Environment", "Kill", "Timeout", "Restart", "Type=")
    lines = unit.read_text().splitlines()
    section = ""
    stripped = []
    for line in lines:
        if line.startswith("["):
            section = line
        if section == "[Service]" and "=" in line and not line.startswith(keep) and not line.startswith("#"):
            continue
        stripped.append(line)
    work = tmpdir()
    try:
        copy = work / "airlock.service"
        copy.write_text("\n".join(stripped) + "\n")
        must_fail(exposure_ok, copy, what="the replica without its hardening")
    finally:
        shutil.rmtree(work)


# Options that give the unit a mount namespace of its own (the agent's mounts
# would not reach the host, nor the next agent) or that every guest inherits.
NODE_FORBIDDEN = [
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags",
    "PrivateNetwork", "PrivateUsers", "PrivateIPC", "NetworkNamespacePath",
    "NoNewPrivileges", "SystemCallFilter", "MemoryDenyWriteExecute",
    "CapabilityBoundingSet", "RestrictNamespaces", "LockPersonality",
    "RestrictAddressFamilies", "DynamicUser", "User", "OOMScoreAdjust", "MemoryMax",
]


def node_unit_policy(text: str) -> None:
    u = parse_unit(text)
    svc = u.get("Service", {})
    need(one(u, "Service", "KillMode") == "process", "node: KillMode=process (its VMs stay in its cgroup)")
    need(one(u, "Service", "Delegate") == "yes", "node: Delegate=yes")
    need(one(u, "Service", "KillSignal") == "SIGTERM", "node: KillSignal=SIGTERM")
    need(one(u, "Service", "Type") == "exec", "node: Type=exec")
    need(seconds(one(u, "Service", "TimeoutStopSec")) <= LEASE_S, f"node: TimeoutStopSec at most the lease ({LEASE_S} s)")
    need(one(u, "Service", "Restart") in ("always", "on-failure"), "node: Restart")
    start = one(u, "Service", "ExecStart") or ""
    need(start.split()[:2] == [BINARY, "node"], f"node: ExecStart runs `airlock node`: {start}")
    need("--config /etc/airlock/node.toml" in start, "node: --config /etc/airlock/node.toml")
    bad = [k for k in NODE_FORBIDDEN if k in svc]
    need(not bad, f"node: options that break the agent or its guests: {bad}")


def replica_unit_policy(text: str) -> None:
    u = parse_unit(text)
    need(one(u, "Service", "User") not in (None, "root", "0"), "replica: runs as a user of its own")
    need(one(u, "Service", "KillSignal") == "SIGTERM", "replica: KillSignal=SIGTERM")
    need(one(u, "Service", "KillMode") in ("mixed", "control-group"), "replica: nothing outlives it")
    need(one(u, "Service", "NoNewPrivileges") == "yes", "replica: NoNewPrivileges=yes")
    need(one(u, "Service", "CapabilityBoundingSet") == "", "replica: no capabilities")
    need(one(u, "Service", "ProtectSystem") == "strict", "replica: ProtectSystem=strict")
    start = one(u, "Service", "ExecStart") or ""
    need(start.split()[:2] == [BINARY, "up"], f"replica: ExecStart runs `airlock up`: {start}")


def check_unit_policies():
    node = (DEPLOY / "systemd" / "airlock-node.service").read_text()
    replica = (DEPLOY / "systemd" / "airlock.service").read_text()
    node_unit_policy(node)
    replica_unit_policy(replica)
    must_fail(node_unit_policy, node.replace("\nKillMode=process\n", "\nKillMode=mixed\n"), what="node KillMode=mixed")
    must_fail(node_unit_policy, node.replace("[Service]", "[Service]\nProtectSystem=strict"), what="node ProtectSystem")
    must_fail(node_unit_policy, node.replace("[Service]", "[Service]\nNoNewPrivileges=yes"), what="node NoNewPrivileges")
    must_fail(node_unit_policy, node.replace("TimeoutStopSec=10", "TimeoutStopSec=90"), what="node stop past the lease")
    must_fail(replica_unit_policy, replica.replace("User=airlock", "User=root"), what="replica as root")


# ------------------------------------------------------------- Kubernetes


def kube_files() -> list[Path]:
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    need(len(files) >= 4, f"Kubernetes files: {files}")
    return files


def kube_validate(files: list[Path]) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    run = subprocess.run(
        [str(tool), "--strict", "--no-warn", "-k", KUBE_VERSION, *map(str, files)],
        capture_output=True,
        text=True,
    )
    said = (run.stdout + run.stderr).strip()
    need(run.returncode == 0 and "ERROR" not in said, f"kubernetes-validate: {said}")
    passed = said.count(" passed for resource ")
    need(passed >= len(files), f"kubernetes-validate checked {passed} resources: {said}")


def check_kube_validate():
    kube_validate(kube_files())


def check_kube_validate_catches_breakage():
    ds = (DEPLOY / "kubernetes" / "node-daemonset.yaml").read_text()
    dep = (DEPLOY / "kubernetes" / "replica-deployment.yaml").read_text()
    for name, good, bad, what in [
        ("node-daemonset.yaml", ds, ds.replace("hostPID: true", "hostPId: true"), "a misspelt field"),
        ("replica-deployment.yaml", dep, dep.replace("replicas: 2", "replicas: two"), "a string for a number"),
        ("node-daemonset.yaml", ds, ds.replace("kind: DaemonSet", "kind: DaemonSets"), "an unknown kind"),
    ]:
        need(bad != good, f"the breakage did not apply: {what}")
        work = tmpdir()
        try:
            (work / name).write_text(bad)
            must_fail(kube_validate, [work / name], what=what)
        finally:
            shutil.rmtree(work)


def kube_docs() -> dict[tuple[str, str], dict]:
    out = {}
    for f in kube_files():
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def daemonset_policy(ds: dict) -> None:
    pod = ds["spec"]["template"]["spec"]
    need(pod.get("hostPID") is True, "DaemonSet: hostPID (a pod's PID namespace ends with it)")
    need(pod.get("hostNetwork") is True, "DaemonSet: hostNetwork")
    need(ds["spec"].get("updateStrategy", {}).get("type") == "OnDelete", "DaemonSet: OnDelete updates")
    need(pod.get("terminationGracePeriodSeconds", 30) <= LEASE_S, f"DaemonSet: a grace period within the lease ({LEASE_S} s)")
    (c,) = [c for c in pod["containers"] if c["name"] == "node"]
    need(c.get("securityContext", {}).get("privileged") is True, "DaemonSet: privileged")
    need(c["command"][:2] == [BINARY, "node"], f"DaemonSet: runs `airlock node`: {c['command']}")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ["/var/lib/airlock", "/run/netns"]:
        need(
            mounts.get(path, {}).get("mountPropagation") == "Bidirectional",
            f"DaemonSet: {path} with Bidirectional propagation",
        )
    volumes = {v["name"]: v for v in pod["volumes"]}
    cg = mounts.get("/sys/fs/cgroup")
    need(
        cg is not None and volumes[cg["name"]].get("hostPath", {}).get("path") == "/sys/fs/cgroup",
        "DaemonSet: the host's /sys/fs/cgroup",
    )


def deployment_policy(dep: dict) -> None:
    pod = dep["spec"]["template"]["spec"]
    need(pod.get("securityContext", {}).get("runAsNonRoot") is True, "Deployment: runAsNonRoot")
    need(not pod.get("hostPID") and not pod.get("hostNetwork"), "Deployment: no host namespaces")
    (c,) = [c for c in pod["containers"] if c["name"] == "replica"]
    sc = c.get("securityContext", {})
    need(sc.get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation false")
    need(not sc.get("privileged"), "Deployment: not privileged")
    need(sc.get("readOnlyRootFilesystem") is True, "Deployment: read-only root")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], "Deployment: drops every capability")
    need(c["command"][:2] == [BINARY, "up"], f"Deployment: runs `airlock up`: {c['command']}")
    need(c["readinessProbe"]["httpGet"]["path"] == "/healthz", "Deployment: readiness on /healthz")
    for init in pod.get("initContainers", []):
        isc = init.get("securityContext", {})
        caps = isc.get("capabilities", {})
        need(
            caps.get("drop") == ["ALL"] and set(caps.get("add", [])) <= {"CHOWN"},
            f"Deployment: init container {init['name']} holds CAP_CHOWN at most",
        )
        need(isc.get("allowPrivilegeEscalation") is False, f"Deployment: init container {init['name']} cannot escalate")
    roll = dep["spec"]["strategy"]["rollingUpdate"]
    need(roll["maxUnavailable"] == 0, "Deployment: a rolling update keeps every replica until its successor is ready")


def secret_refs(doc: dict) -> set[str]:
    """The keys of the Secret `airlock-cluster` a workload reads."""
    keys = set()
    pod = doc["spec"]["template"]["spec"]
    for c in pod.get("initContainers", []) + pod["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                need(ref["name"] == "airlock-cluster", f"secret {ref['name']}")
                keys.add(ref["key"])
    for v in pod.get("volumes", []):
        if "secret" in v:
            need(v["secret"]["secretName"] == "airlock-cluster", "secret name")
            keys.update(i["key"] for i in v["secret"].get("items", []))
    return keys


def node_toml(text: str) -> dict:
    return tomllib.loads(text)


def config_policy(replica: dict, node: dict) -> None:
    need(replica.get("cluster", {}).get("enabled") is True, "replica config: [cluster] enabled = true")
    need(bool(replica["cluster"].get("token_file")), "replica config: [cluster] token_file")
    need(bool(node.get("cluster", {}).get("token_file")), "node config: [cluster] token_file")
    need(bool(node.get("node", {}).get("name")), "node config: [node] name")
    listen = node.get("node", {}).get("listen", "")
    need(re.fullmatch(r"[0-9.]+:\d+", listen) is not None, f"node config: [node] listen {listen!r}")
    need(replica.get("address_pool") == node.get("address_pool") == ADDRESS_POOL, "one address pool for all")
    need(node.get("data_dir") == "/var/lib/airlock", "node config: data_dir")
    need("database_url" not in replica and "database_url" not in node, "no database URL (a password) in a config")


def check_kube_policies():
    docs = kube_docs()
    ds = docs[("DaemonSet", "airlock-node")]
    dep = docs[("Deployment", "airlock")]
    daemonset_policy(ds)
    deployment_policy(dep)
    secret = docs[("Secret", "airlock-cluster")]
    have = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for workload in (ds, dep):
        missing = secret_refs(workload) - have
        need(not missing, f"{workload['kind']} reads Secret keys it lacks: {missing}")
    svc = docs[("Service", "airlock")]
    need(svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], "the Service selects the replicas")
    cm = docs[("ConfigMap", "airlock-config")]["data"]
    filled = cm["node.toml"].replace("@NODE_NAME@", "k8s-node-1").replace("@HOST_IP@", "10.0.0.11")
    config_policy(tomllib.loads(cm["airlock.toml"]), node_toml(filled))
    # The init container fills in exactly the placeholders the template has.
    init = " ".join(ds["spec"]["template"]["spec"]["initContainers"][0]["command"])
    for ph in set(re.findall(r"@[A-Z_]+@", cm["node.toml"])):
        need(ph in init, f"the node's init container does not fill in {ph}")

    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["hostPID"] = False
    must_fail(daemonset_policy, broken, what="DaemonSet without hostPID")
    broken = yaml.safe_load(yaml.safe_dump(ds))
    for m in broken["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]:
        m.pop("mountPropagation", None)
    must_fail(daemonset_policy, broken, what="DaemonSet without mount propagation")
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    must_fail(deployment_policy, broken, what="privileged replica")
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    must_fail(deployment_policy, broken, what="replica init container with SYS_ADMIN")
    must_fail(
        config_policy,
        tomllib.loads(cm["airlock.toml"].replace("enabled = true", "enabled = false")),
        node_toml(filled),
        what="replica config without cluster mode",
    )


# ------------------------------------------------------------------ Nomad

NOMAD_OPTIONS = hcl2.SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True
)


def nomad_load(text: str) -> dict:
    try:
        return hcl2.loads(text, serialization_options=NOMAD_OPTIONS)
    except Exception as e:  # the parser's errors have no common base class
        raise Failed(f"python-hcl2 could not parse it: {type(e).__name__}: {str(e)[:300]}")


def labelled(blocks: list[dict], kind: str) -> dict[str, dict]:
    out = {}
    for b in blocks:
        need(len(b) == 1, f"{kind}: one label per block")
        (label, body), = b.items()
        out[label] = body
    return out


def heredoc(value: str) -> str:
    m = re.fullmatch(r"<<(-?)([A-Z]+)\n(.*)\n\s*\2", value, re.S)
    need(m is not None, f"not a heredoc: {value[:60]!r}")
    return textwrap.dedent(m.group(3)) if m.group(1) else m.group(3)


def render(template: str) -> str:
    """What Nomad's template would write, with sample values for the client."""
    sample = {
        "attr.unique.network.ip-address": "10.0.0.11",
        "node.unique.name": "nomad-client-1",
        "NOMAD_SECRETS_DIR": "/alloc/secrets",
    }
    def env(m):
        need(m.group(1) in sample, f"a template reads {m.group(1)}, which this check has no sample for")
        return sample[m.group(1)]
    return re.sub(r'\{\{ env "([^"]+)" \}\}', env, template)


def one_task(job: dict, name: str) -> tuple[dict, dict, dict]:
    (jobname, body), = labelled(job["job"], "job").items()
    need(jobname == name, f"job name {jobname}")
    groups = labelled(body["group"], "group")
    need(len(groups) == 1, "one group")
    (group,) = groups.values()
    tasks = labelled(group["task"], "task")
    need(len(tasks) == 1, "one task")
    (task,) = tasks.values()
    return body, group, task


def config_template(task: dict) -> dict:
    (t,) = [t for t in task["template"] if t["destination"].endswith(".toml")]
    return tomllib.loads(render(heredoc(t["data"])))


def nomad_node_policy(job: dict) -> dict:
    body, group, task = one_task(job, "airlock-node")
    need(body["type"] == "system", "node job: type system (one per client)")
    need(task["driver"] == "raw_exec", "node job: raw_exec (host namespaces, root)")
    (cfg,) = task["config"]
    need(cfg["command"] == BINARY and cfg["args"][0] == "node", "node job: runs `airlock node`")
    need(task["kill_signal"] == "SIGTERM", "node job: kill_signal SIGTERM")
    need(seconds(task.get("kill_timeout")) <= LEASE_S, f"node job: kill_timeout within the lease ({LEASE_S} s)")
    need("user" not in task, "node job: runs as root")
    return config_template(task)


def nomad_replica_policy(job: dict) -> dict:
    body, group, task = one_task(job, "airlock")
    need(body["type"] == "service", "replica job: type service")
    (upd,) = group["update"]
    need(upd["max_parallel"] == 1, "replica job: one replica at a time in an update")
    (svc,) = group["service"]
    (chk,) = svc["check"]
    need(chk["type"] == "http" and chk["path"] == "/healthz", "replica job: health check on /healthz")
    need(task["driver"] in ("exec", "docker"), "replica job: an isolating driver")
    need(task.get("user") not in (None, "root"), "replica job: an unprivileged user")
    (cfg,) = task["config"]
    need(cfg["command"] == BINARY and cfg["args"][0] == "up", "replica job: runs `airlock up`")
    need(task["kill_signal"] == "SIGTERM", "replica job: kill_signal SIGTERM")
    for t in task["template"]:
        if t["destination"].startswith("secrets/") and not t.get("env"):
            need(t.get("perms") == "0600", f"replica job: {t['destination']} is 0600")
    return config_template(task)


def nomad_text(name: str) -> str:
    return (DEPLOY / "nomad" / name).read_text()


def check_nomad_parse():
    for name in ["airlock-node.nomad.hcl", "airlock.nomad.hcl"]:
        nomad_load(nomad_text(name))


def check_nomad_parse_catches_breakage():
    text = nomad_text("airlock-node.nomad.hcl")
    for what, bad in [
        ("a missing closing brace", text.rstrip().rstrip("}")),
        ("an unterminated string", text.replace('type        = "system"', 'type = "system')),
        ("a missing '='", text.replace('driver = "raw_exec"', 'driver "raw_exec" x')),
    ]:
        need(bad != text, f"the breakage did not apply: {what}")
        must_fail(nomad_load, bad, what=what)


def check_nomad_policies():
    node_job = nomad_load(nomad_text("airlock-node.nomad.hcl"))
    replica_job = nomad_load(nomad_text("airlock.nomad.hcl"))
    config_policy(nomad_replica_policy(replica_job), nomad_node_policy(node_job))
    must_fail(
        nomad_node_policy,
        nomad_load(nomad_text("airlock-node.nomad.hcl").replace('"system"', '"service"')),
        what="node job as a service job",
    )
    must_fail(
        nomad_node_policy,
        nomad_load(nomad_text("airlock-node.nomad.hcl").replace('"raw_exec"', '"exec"')),
        what="node job under exec",
    )
    must_fail(
        nomad_replica_policy,
        nomad_load(nomad_text("airlock.nomad.hcl").replace('perms       = "0600"', 'perms = "0644"')),
        what="replica secrets readable by others",
    )


# ------------------------------------------------------------------- docs


def docs_configs(text: str) -> tuple[dict, dict]:
    """The replica's and the node's config files as docs/deploy.md shows them."""
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    need(len(blocks) >= 2, f"docs/deploy.md shows {len(blocks)} TOML blocks, not the two configs")
    try:
        parsed = [tomllib.loads(b) for b in blocks]
    except tomllib.TOMLDecodeError as e:
        raise Failed(f"docs/deploy.md: a TOML block does not parse: {e}")
    replicas = [p for p in parsed if p.get("cluster", {}).get("enabled") is True]
    nodes = [p for p in parsed if "node" in p]
    need(len(replicas) == 1 and len(nodes) == 1, "docs/deploy.md: one replica and one node config")
    return replicas[0], nodes[0]


def check_docs_configs():
    """The configs docs/deploy.md tells people to write hold what the checks above ask."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    config_policy(*docs_configs(text))
    must_fail(docs_configs, text.replace('name = "node-a"', 'name = node-a'), what="a TOML error in the docs")
    must_fail(
        lambda t: config_policy(*docs_configs(t)),
        text.replace('address_pool = "10.248.0.0/16"   # the same', 'address_pool = "10.249.0.0/16"   # the same'),
        what="two address pools in the docs",
    )


# ------------------------------------------------------------------- main

CHECKS = [
    check_units_verify,
    check_units_verify_catches_breakage,
    check_replica_hardened,
    check_unit_policies,
    check_kube_validate,
    check_kube_validate_catches_breakage,
    check_kube_policies,
    check_nomad_parse,
    check_nomad_parse_catches_breakage,
    check_nomad_policies,
    check_docs_configs,
]


def main() -> int:
    passed = failed = 0
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            check()
        except Failed as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        except Exception:
            failed += 1
            print(f"FAIL {name}: {traceback.format_exc()}")
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"deploy: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
