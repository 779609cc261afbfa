# NixOS module: services.kvraft, one kvraft node per host.
#
# The unit is the same hardened unit as packaging/systemd/kvraft.service
# (keep the two in step): Type=notify, the watchdog, a dynamic user with its
# state in /var/lib/kvraft, and the full sandbox. The configuration is rendered
# to /etc/kvraft/kvraft.toml from the typed options below plus `settings`
# (any other kvraftd key; `settings` wins over the typed options).
#
# TLS (services.kvraft.tls): certificates and keys stay where they are on the
# host, outside the Nix store (the store is world-readable). systemd copies
# them at start with LoadCredential= into the unit's private credentials
# directory, which only the dynamic user can read, and kvraftd is pointed there
# (KVRAFT_*_FILE=%d/...), as packaging/systemd/kvraft.service.d/tls.conf does.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.kvraft;
  settingsFormat = pkgs.formats.toml { };

  initialClusterString =
    if cfg.initialCluster == null then null
    else if builtins.isString cfg.initialCluster then cfg.initialCluster
    else lib.concatStringsSep "," (lib.mapAttrsToList (id: addr: "${id}=${addr}") cfg.initialCluster);

  tls = cfg.tls;

  clientRolesString =
    if tls.clientRoles == null then null
    else if builtins.isString tls.clientRoles then tls.clientRoles
    else lib.concatStringsSep "," (lib.mapAttrsToList (name: role: "${name}=${role}") tls.clientRoles);

  # Credential name -> (config key, host path). Each file set is loaded into
  # the credentials directory under its own name (one file may be given for
  # two keys, e.g. the same certificate for both ports).
  tlsFiles = lib.filterAttrs (_: f: f.path != null) {
    "cert.pem" = { key = "cert_file"; path = tls.certFile; };
    "key.pem" = { key = "key_file"; path = tls.keyFile; };
    "ca.pem" = { key = "trusted_ca_file"; path = tls.trustedCaFile; };
    "peer-cert.pem" = { key = "peer_cert_file"; path = tls.peerCertFile; };
    "peer-key.pem" = { key = "peer_key_file"; path = tls.peerKeyFile; };
    "peer-ca.pem" = { key = "peer_trusted_ca_file"; path = tls.peerTrustedCaFile; };
  };
  fileKeys = [ "cert_file" "key_file" "trusted_ca_file" "peer_cert_file" "peer_key_file" "peer_trusted_ca_file" ];

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
    // { client_cert_auth = tls.clientCertAuth; metrics_tls = tls.metricsTls; }
    // lib.optionalAttrs (clientRolesString != null) { client_roles = clientRolesString; }
    // cfg.settings;

  # What kvraftd will see, for the assertions below (which mirror its own
  # checks, so a bad combination fails at evaluation, not at start).
  has = name: builtins.hasAttr name tlsFiles;
  clientCertAuth = effectiveSettings.client_cert_auth or false;
  metricsTls = effectiveSettings.metrics_tls or false;
  clientRolesSet = (effectiveSettings.client_roles or null) != null;
  peerFiles = lib.count has [ "peer-cert.pem" "peer-key.pem" "peer-ca.pem" ];

  # Absolute and outside the store: a Nix path literal (./node.key) or a store
  # path would put the key in the world-readable store.
  secretPath = lib.types.pathWith { absolute = true; inStore = false; };
  # Certificates are public: any absolute path (the store is fine).
  publicPath = lib.types.pathWith { absolute = true; };

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

    tls = {
      certFile = lib.mkOption {
        type = lib.types.nullOr publicPath;
        default = null;
        example = "/etc/kvraft/tls/node.pem";
        description = ''
          PEM certificate of the client port; with keyFile it turns TLS on there
          (`cert_file`). Also serves the metrics endpoint when metricsTls is set.
          Loaded with LoadCredential=, so it may be readable by root only.
        '';
      };

      keyFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/etc/kvraft/tls/node.key";
        description = ''
          PEM private key of certFile (`key_file`): a path on the host outside
          the Nix store (a string, not a Nix path, which would be copied into
          the world-readable store), e.g. root-owned with mode 0600. systemd
          copies it at start into the unit's credentials directory; after
          replacing it, restart the service (a reload re-reads the copy).
        '';
      };

      trustedCaFile = lib.mkOption {
        type = lib.types.nullOr publicPath;
        default = null;
        example = "/etc/kvraft/tls/ca.pem";
        description = "PEM CA bundle that signs client certificates (`trusted_ca_file`); needs certFile and keyFile.";
      };

      clientCertAuth = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Require every client to present a certificate signed by trustedCaFile (`client_cert_auth`).";
      };

      clientRoles = lib.mkOption {
        type = lib.types.nullOr (lib.types.either lib.types.str (lib.types.attrsOf (lib.types.enum [ "read" "write" "admin" ])));
        default = null;
        example = { admin = "admin"; app = "write"; dashboard = "read"; };
        description = ''
          Client identities (certificate common names) and their roles
          (`client_roles`): read (get, scan, members, info, ping), write (read
          plus set, delete), admin (write plus add-node, remove-node). An
          attribute set name -> role, or the string "NAME=ROLE,...". When set,
          unlisted identities are refused; null: every client with a valid
          certificate may do everything. Needs clientCertAuth.
        '';
      };

      peerCertFile = lib.mkOption {
        type = lib.types.nullOr publicPath;
        default = null;
        example = "/etc/kvraft/tls/node.pem";
        description = ''
          PEM certificate of the peer port (`peer_cert_file`): common name
          kvraft-node-<nodeId>, usable for server and client authentication
          (`kvraft certs init` makes such certificates). With peerKeyFile and
          peerTrustedCaFile (all three or none) it turns on mutual TLS between nodes.
        '';
      };

      peerKeyFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/etc/kvraft/tls/node.key";
        description = "PEM private key of peerCertFile (`peer_key_file`); outside the Nix store, as keyFile.";
      };

      peerTrustedCaFile = lib.mkOption {
        type = lib.types.nullOr publicPath;
        default = null;
        example = "/etc/kvraft/tls/ca.pem";
        description = "PEM CA bundle that signs every node's peer certificate (`peer_trusted_ca_file`).";
      };

      metricsTls = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Serve /metrics, /health and /ready over HTTPS with certFile (`metrics_tls`; no client certificate asked).";
      };
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
      {
        assertion = has "cert.pem" == has "key.pem";
        message = "services.kvraft.tls: certFile and keyFile go together (the client port's certificate and its key).";
      }
      {
        assertion = has "ca.pem" -> has "cert.pem";
        message = "services.kvraft.tls.trustedCaFile needs certFile and keyFile: client certificates are checked only over TLS.";
      }
      {
        assertion = clientCertAuth -> has "ca.pem";
        message = "services.kvraft.tls.clientCertAuth needs trustedCaFile (the CA that signs client certificates) and certFile/keyFile.";
      }
      {
        assertion = clientRolesSet -> clientCertAuth;
        message = "services.kvraft.tls.clientRoles needs clientCertAuth: identities are the common names of verified client certificates.";
      }
      {
        assertion = tls.clientRoles != { } && tls.clientRoles != "";
        message = "services.kvraft.tls.clientRoles is empty; give NAME = ROLE for every client identity, or leave it null.";
      }
      {
        assertion = peerFiles == 0 || peerFiles == 3;
        message = "services.kvraft.tls: peerCertFile, peerKeyFile and peerTrustedCaFile go together (peer TLS is mutual).";
      }
      {
        assertion = metricsTls -> has "cert.pem";
        message = "services.kvraft.tls.metricsTls needs certFile and keyFile: they serve the metrics endpoint too.";
      }
      {
        assertion = lib.all (key: !(cfg.settings ? ${key})) fileKeys;
        message = "services.kvraft.settings: set certificate and key files with services.kvraft.tls.* (loaded as systemd credentials), not ${lib.concatStringsSep "/" fileKeys} in settings.";
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
        # SIGHUP re-reads the configuration, applies a new log_filter and
        # re-reads the TLS files: the copies in the credentials directory,
        # made at start, so renewed files need a restart.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        # The file keys point into the credentials directory (%d); the
        # environment overrides the rendered file.
        Environment = [ "KVRAFT_DATA_DIR=${cfg.dataDir}" ]
          ++ lib.mapAttrsToList (name: f: "KVRAFT_${lib.toUpper f.key}=%d/${name}") tlsFiles;
        # systemd (root) copies each file at start into a directory only the
        # dynamic user can read: the keys can stay root-only on the host.
        LoadCredential = lib.mapAttrsToList (name: f: "${name}:${f.path}") tlsFiles;
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
