# `airlock node` on every Nomad client that may run sandboxes: a system job,
# one allocation per client (docs/deploy.md). Mark those clients in their
# agent config: `client { meta { airlock_node = "true" } }`.
#
# Driver raw_exec, not exec: the agent must run as root in the host's own
# namespaces. exec would give it a chroot and a PID namespace of its own, and
# a PID namespace ends with its first process: every nspawn container and VM
# in it would be killed at the agent's first restart. raw_exec is off by
# default; enable it on these clients only:
#   plugin "raw_exec" { config { enabled = true } }
#
# Sandboxes and restarts: Nomad tracks a raw_exec task's processes by a
# cgroup of the task and ends what is left there when the task stops. The
# nspawn driver moves each sandbox into /sys/fs/cgroup/airlock/<id> before it
# starts, and the Firecracker jailer into a cgroup of its own, so those
# outlive a restart of this task; QEMU VMs (and Firecracker without the
# jailer) stay in the task's cgroup and do NOT (docs/deploy.md).
#
# Secrets: Nomad Variables at nomad/jobs/airlock-node, items database_url and
# cluster_token. The vault keyring is the host's /var/lib/airlock/vault.keys
# (0600), the same file on every node and replica.
job "airlock-node" {
  type        = "system"
  datacenters = ["*"]

  constraint {
    attribute = "${meta.airlock_node}"
    value     = "true"
  }

  group "node" {
    # Restart in place, never give up: the sandboxes of this host wait for it.
    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    network {
      port "node_api" {
        static = 4100
      }
      port "webrtc" {
        static = 4001
      }
    }

    task "node" {
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/airlock"
        args    = ["node", "--config", "${NOMAD_TASK_DIR}/node.toml"]
      }

      # Graceful shutdown: the agent stops taking work and exits; its
      # sandboxes keep running. Short: the node's lease (15 s or less) is not
      # renewed while no agent runs, and an expired lease marks the node's
      # sandboxes failed.
      kill_signal  = "SIGTERM"
      kill_timeout = "10s"

      template {
        destination = "local/node.toml"
        change_mode = "restart"
        data        = <<-EOT
          data_dir = "/var/lib/airlock"
          address_pool = "10.248.0.0/16"
          driver = "nspawn"

          [cluster]
          token_file = "{{ env "NOMAD_SECRETS_DIR" }}/cluster.token"

          [node]
          name = "{{ env "node.unique.name" }}"
          listen = "{{ env "attr.unique.network.ip-address" }}:4100"
        EOT
      }

      template {
        destination = "secrets/cluster.token"
        perms       = "0600"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/airlock-node\" }}{{ .cluster_token }}{{ end }}"
      }

      template {
        destination = "secrets/db.env"
        env         = true
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/airlock-node\" }}AIRLOCK_DATABASE_URL={{ .database_url }}{{ end }}"
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
