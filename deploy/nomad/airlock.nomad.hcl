# `airlock up` replicas (API and UI): a service job, behind the load balancer
# that terminates TLS and routes to the service `airlock` (docs/deploy.md).
#
# A replica needs no privilege, so it runs under the exec driver (a chroot,
# its own PID namespace) as the unprivileged user `airlock` (create it on the
# clients: deploy/systemd/airlock.sysusers.conf). Its data dir is the task's
# secrets dir (holding only the lock file, the keyring and the token); the
# rest is in PostgreSQL, so any allocation may go anywhere.
#
# Secrets: Nomad Variables at nomad/jobs/airlock, items database_url,
# cluster_token and vault_keys (the cluster's vault.keys, the same on every
# replica and node). Set uid/gid below to the airlock user's ids on the
# clients (`id airlock`): the keyring and token must be its own, mode 0600.
job "airlock" {
  type        = "service"
  datacenters = ["*"]

  group "replica" {
    count = 2

    # A rolling restart: one replica at a time, the next only once this one
    # has passed its health check; a bad version goes back by itself.
    update {
      max_parallel     = 1
      min_healthy_time = "10s"
      healthy_deadline = "2m"
      auto_revert      = true
    }

    network {
      port "http" {}
    }

    service {
      name     = "airlock"
      port     = "http"
      provider = "nomad"

      # /healthz is the one path the front door does not check.
      check {
        type     = "http"
        path     = "/healthz"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "replica" {
      driver = "exec"
      user   = "airlock"

      config {
        command = "/usr/local/bin/airlock"
        args    = ["up", "--config", "${NOMAD_TASK_DIR}/airlock.toml"]
      }

      env {
        AIRLOCK_LISTEN   = "${NOMAD_ADDR_http}"
        AIRLOCK_DATA_DIR = "${NOMAD_SECRETS_DIR}"
      }

      # SIGTERM, then time to finish the requests in flight.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"
      # Out of the load balancer's rotation before the signal.
      shutdown_delay = "5s"

      template {
        destination = "local/airlock.toml"
        change_mode = "restart"
        data        = <<-EOT
          address_pool = "10.248.0.0/16"
          public_hosts = ["airlock.example.com"]
          allowed_origins = []

          [cluster]
          enabled = true
          token_file = "{{ env "NOMAD_SECRETS_DIR" }}/cluster.token"
        EOT
      }

      template {
        destination = "secrets/cluster.token"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/airlock\" }}{{ .cluster_token }}{{ end }}"
      }

      template {
        destination = "secrets/vault.keys"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/airlock\" }}{{ .vault_keys }}{{ end }}"
      }

      template {
        destination = "secrets/db.env"
        env         = true
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/airlock\" }}AIRLOCK_DATABASE_URL={{ .database_url }}{{ end }}"
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
