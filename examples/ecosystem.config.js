// A PM2 ecosystem file, read with PM2's meaning: times in milliseconds,
// the interpreter from the script's extension, env_<profile> for --env.
// Its twin ecosystem.config.json holds the same apps; the tests load both.
//
//   python3 oxmgr.py start examples/ecosystem.config.js --env production
//   python3 oxmgr.py convert examples/ecosystem.config.js -o oxfile.toml
module.exports = {
  apps: [
    {
      name: "api",
      script: "apps/api.py",          // .py: run by the Python that runs oxmgr
      instances: 2,
      instance_var: "INSTANCE_ID",
      exec_mode: "fork",
      env: { PORT: 8090, LOG_LEVEL: "info", DEBUG: false },
      env_production: { LOG_LEVEL: "warning" },
      max_memory_restart: "150M",
      kill_timeout: 3000,             // ms: 3 s, then SIGKILL
      restart_delay: 250,             // ms
      min_uptime: 2000,               // ms
      max_restarts: 5,
      listen_timeout: 8000,           // ms to become ready
      out_file: "logs/api.out.log",   // per instance: logs/api.out-0.log ...
      error_file: "logs/api.err.log",
      time: true,
    },
    {
      name: "worker",
      script: "apps/worker.py",
      args: ["--queue", "critical"],
      autorestart: true,
      exp_backoff_restart_delay: 100, // ms, grows x1.5 per crash
      stop_exit_codes: [0],
      cron_restart: "0 3 * * *",      // every night at 03:00
      watch: false,
      namespace: "jobs",
    },
  ],
};
