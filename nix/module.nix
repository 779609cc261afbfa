# NixOS module: services.kvraft, one kvraft node per host.
#
# The unit is the same hardened unit as packaging/systemd/kvraft.service
# (keep the two in step): Type=notify, the watchdog, a dynamic user with its
# state in /var/lib/kvraft, and the full sandbox. The configuration is rendered
# to /etc/kvraft/kvraft.toml from the typed options below plus `settings`
# (any other kvraftd key; `settings` wins over the typed options).
{ config, lib, pkgs, ... }:

let
  cfg = config.services.kvraft;
  settingsFormat = pkgs.formats.toml { };

  initialClusterString =
    if cfg.initialCluster == null then null
    else if builtins.isString cfg.initialCluster then cfg.initialCluster
    else lib.concatStringsSep "," (lib.mapAttrsToList (id: addr: "${id}=${addr}") cfg.initialCluster);

  effectiveSettings =
    {
      id = cfg.nodeId;
      data_dir = cfg.dataDir;
      client_addr = cfg.clientAddr;
      peer_addr = cfg.peerAddr;
      join = cfg.join;
    }
    // lib.optionalAttrs (cfg.advertiseClientAddr != null) { advertise_client_addr = cfg.advertiseClientAddr; }
    // lib.optionalAttrs (cfg.advertisePeerAddr != null) { advertise_peer_addr = cfg.advertisePeerAddr; }
    // lib.optionalAttrs (initialClusterString != null) { initial_cluster = initialClusterString; }
    // cfg.settings;

  configFile = settingsFormat.generate "kvraft.toml" effectiveSettings;

  # "HOST:PORT" -> PORT (also "[::]:PORT").
  portOf = addr: lib.toInt (lib.last (lib.splitString ":" addr));

  stateDirectory = lib.removePrefix "/var/lib/" cfg.dataDir;
in
{
  options.services.kvraft = {
    enable = lib.mkEnableOption "kvraft, a replicated key-value store node";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The kvraft package (kvraftd and the kvraft CLI). The flake's nixosModules.default sets it to the flake's build.";
    };

    nodeId = lib.mkOption {
      type = lib.types.ints.positive;
      example = 1;
      description = "This node's id: positive, unique in the cluster, never reused after a removal (config key `id`).";
    };

    clientAddr = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:7379";
      example = "0.0.0.0:7379";
      description = "Where clients connect (`client_addr`).";
    };

    peerAddr = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:7380";
      example = "0.0.0.0:7380";
      description = "Where the other nodes connect (`peer_addr`).";
    };

    advertiseClientAddr = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "10.0.0.1:7379";
      description = "The client address other nodes and clients dial; required when clientAddr is 0.0.0.0 (`advertise_client_addr`).";
    };

    advertisePeerAddr = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "10.0.0.1:7380";
      description = "The peer address other nodes dial; required when peerAddr is 0.0.0.0 (`advertise_peer_addr`).";
    };

    initialCluster = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.str (lib.types.attrsOf lib.types.str));
      default = null;
      example = { "1" = "10.0.0.1:7380"; "2" = "10.0.0.2:7380"; "3" = "10.0.0.3:7380"; };
      description = ''
        The initial members of a new cluster, the same on every initial member:
        an attribute set id -> peer address, or the string "ID=HOST:PORT,...".
        Read only while the data directory is empty. null: this node alone.
      '';
    };

    join = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Start empty and wait to be added with `kvraft add-node` (excludes initialCluster).";
    };

    dataDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/kvraft";
      description = "The data directory; must be under /var/lib (it is the unit's StateDirectory, owned by its dynamic user, mode 0700).";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = { snapshot_threshold = 50000; log_filter = "info,raft=warn"; metrics_addr = "0.0.0.0:9379"; };
      description = ''
        Further kvraftd configuration keys (see packaging/kvraft.example.toml),
        rendered with the typed options to /etc/kvraft/kvraft.toml. Keys set
        here override the typed options. Unknown keys make kvraftd refuse to start.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the client and peer ports (and metrics_addr's port, if set in settings) in the firewall.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.hasPrefix "/var/lib/" cfg.dataDir && stateDirectory != "";
        message = "services.kvraft.dataDir must be a directory under /var/lib (it is the unit's StateDirectory).";
      }
      {
        assertion = !(cfg.join && cfg.initialCluster != null);
        message = "services.kvraft: join and initialCluster exclude each other.";
      }
    ];

    environment.systemPackages = [ cfg.package ];
    environment.etc."kvraft/kvraft.toml".source = configFile;

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
      [ (portOf cfg.clientAddr) (portOf cfg.peerAddr) ]
      ++ lib.optional ((effectiveSettings.metrics_addr or "") != "") (portOf effectiveSettings.metrics_addr)
    );

    systemd.services.kvraft = {
      description = "kvraft node (replicated key-value store on Raft)";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      restartTriggers = [ configFile ];

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/kvraftd --config /etc/kvraft/kvraft.toml";
        # SIGHUP re-reads the configuration and applies a new log_filter.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Environment = [ "KVRAFT_DATA_DIR=${cfg.dataDir}" ];
        Restart = "on-failure";
        RestartSec = "5s";
        # Pinged at half the interval, only while the raft loop progresses.
        WatchdogSec = "30s";
        # Above shutdown_timeout_ms (default 10 s): handover, drain, final snapshot.
        TimeoutStopSec = "30s";
        LimitNOFILE = 65536;

        DynamicUser = true;
        StateDirectory = stateDirectory;
        StateDirectoryMode = "0700";
        UMask = "0077";

        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        PrivateMounts = true;
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = true;
        PrivateIPC = true;
        DevicePolicy = "closed";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        KeyringMode = "private";
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
