# NixOS module: services.kvraft, one kvraft node per host.
#
# The unit is the same hardened unit as packaging/systemd/kvraft.service
# (keep the two in step): Type=notify, the watchdog, a dynamic user with its
# state in /var/lib/kvraft, and the full sandbox. The configuration is rendered
# to /etc/kvraft/kvraft.toml from the typed options below plus `settings` (any
# other kvraftd key). Each key has one source: a key with a typed option can't
# also be set in `settings`.
#
# What kvraftd would refuse at start fails here instead: the assertions below
# mirror its checks of the typed options, and (checkConfig) the rendered file
# is run through `kvraftd --print-config` when the system is built, which
# catches a bad value in `settings`. tests/nix_packaging.rs evaluates this
# module and feeds every rendered file to the real kvraftd.
#
# TLS (services.kvraft.tls): certificates and keys stay where they are on the
# host, outside the Nix store (the store is world-readable). systemd copies
# them at start with LoadCredential= into the unit's private credentials
# directory, which only the dynamic user can read, and kvraftd is pointed there
# (KVRAFT_*_FILE=%d/...), as packaging/systemd/kvraft.service.d/tls.conf does.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.kvraft;
  tls = cfg.tls;
  settingsFormat = pkgs.formats.toml { };

  # kvraftd's exit status for a configuration error (sysexits' EX_CONFIG).
  exitConfig = 78;
  # The sandbox of both units (node and backup): what `systemd-analyze
  # security` scores, as in packaging/systemd/.
  sandboxing = {
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
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # --- addresses, as kvraftd reads them ------------------------------------

  # "HOST:PORT" -> { host; port; } or null when it isn't one (kvraftd's
  # check_host_port: a non-empty host without blanks, "," or "=", and a port
  # 0-65535; "[::]:7380" has the host "[::]").
  parseHostPort =
    addr:
    let
      m = builtins.match "(.+):([0-9]{1,5})" addr;
      host = builtins.elemAt m 0;
      port = lib.toInt (builtins.elemAt m 1);
    in
    if
      builtins.isString addr
      && m != null
      && builtins.match ".*[[:space:],=].*" host == null
      && port <= 65535
    then
      { inherit host port; }
    else
      null;
  isHostPort = addr: parseHostPort addr != null;
  # (0 for a malformed address, which an assertion reports.)
  portOf =
    addr:
    let
      hp = parseHostPort addr;
    in
    if hp == null then 0 else hp.port;
  # 0.0.0.0 and :: (any spelling kvraftd would parse as unspecified): a bind
  # address nobody can dial.
  isWildcard =
    addr:
    let
      hp = parseHostPort addr;
      host = lib.removeSuffix "]" (lib.removePrefix "[" hp.host);
    in
    hp != null && (host == "0.0.0.0" || builtins.match "[0:]*:[0:]*" host != null);

  # --- the initial members ---------------------------------------------------

  # As a list of { id; addr; } (strings), from either form of the option.
  initialMembers =
    if cfg.initialCluster == null then
      null
    else if builtins.isString cfg.initialCluster then
      map (
        entry:
        let
          kv = builtins.match "[[:space:]]*([^=]*[^=[:space:]])[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*" entry;
        in
        if kv == null then
          {
            id = entry;
            addr = "";
          }
        else
          {
            id = builtins.elemAt kv 0;
            addr = builtins.elemAt kv 1;
          }
      ) (builtins.filter (e: builtins.match "[[:space:]]*" e == null) (lib.splitString "," cfg.initialCluster))
    else
      lib.mapAttrsToList (id: addr: { inherit id addr; }) cfg.initialCluster;

  initialClusterString =
    if initialMembers == null then
      null
    else
      lib.concatMapStringsSep "," (m: "${m.id}=${m.addr}") initialMembers;

  badMembers = lib.filter (
    m: builtins.match "[1-9][0-9]*" m.id == null || !(isHostPort m.addr)
  ) (if initialMembers == null then [ ] else initialMembers);
  ownEntries = lib.filter (m: m.id == toString cfg.nodeId) (
    if initialMembers == null then [ ] else initialMembers
  );
  # The peer address this node advertises, when known before it binds (as
  # kvraftd's own check: not for port 0).
  advertisedPeer =
    if cfg.advertisePeerAddr != null then
      cfg.advertisePeerAddr
    else if isHostPort cfg.peerAddr && !(isWildcard cfg.peerAddr) && portOf cfg.peerAddr != 0 then
      cfg.peerAddr
    else
      null;

  # --- TLS -------------------------------------------------------------------

  clientRolesString =
    if tls.clientRoles == null then
      null
    else if builtins.isString tls.clientRoles then
      tls.clientRoles
    else
      lib.concatStringsSep "," (lib.mapAttrsToList (name: role: "${name}=${role}") tls.clientRoles);

  # Credential name -> (config key, host path). Each file set is loaded into
  # the credentials directory under its own name (one file may be given for
  # two keys, e.g. the same certificate for both ports).
  tlsFileKeys = {
    "cert.pem" = {
      key = "cert_file";
      path = tls.certFile;
    };
    "key.pem" = {
      key = "key_file";
      path = tls.keyFile;
    };
    "ca.pem" = {
      key = "trusted_ca_file";
      path = tls.trustedCaFile;
    };
    "peer-cert.pem" = {
      key = "peer_cert_file";
      path = tls.peerCertFile;
    };
    "peer-key.pem" = {
      key = "peer_key_file";
      path = tls.peerKeyFile;
    };
    "peer-ca.pem" = {
      key = "peer_trusted_ca_file";
      path = tls.peerTrustedCaFile;
    };
  };
  tlsFiles = lib.filterAttrs (_: f: f.path != null) tlsFileKeys;
  has = name: builtins.hasAttr name tlsFiles;
  peerFiles = lib.count has [
    "peer-cert.pem"
    "peer-key.pem"
    "peer-ca.pem"
  ];
  peerTls = peerFiles == 3;
  # The file keys point into the credentials directory (%d) through the
  # environment; the rendered file never names them.
  tlsEnvironment = lib.mapAttrsToList (name: f: "KVRAFT_${lib.toUpper f.key}=%d/${name}") tlsFiles;

  # Absolute and outside the store: a Nix path literal (./node.key) or a store
  # path would put the key in the world-readable store.
  secretPath = lib.types.pathWith {
    absolute = true;
    inStore = false;
  };
  # Certificates are public: any absolute path (the store is fine).
  publicPath = lib.types.pathWith { absolute = true; };

  # --- the rendered configuration --------------------------------------------

  # Every key a typed option sets (null: unset, left out of the file).
  typedKeys = {
    id = cfg.nodeId;
    data_dir = cfg.dataDir;
    client_addr = cfg.clientAddr;
    peer_addr = cfg.peerAddr;
    metrics_addr = cfg.metricsAddr;
    join = cfg.join;
    client_cert_auth = tls.clientCertAuth;
    metrics_tls = tls.metricsTls;
    advertise_client_addr = cfg.advertiseClientAddr;
    advertise_peer_addr = cfg.advertisePeerAddr;
    initial_cluster = initialClusterString;
    client_roles = clientRolesString;
  };
  typedSettings = lib.filterAttrs (_: value: value != null) typedKeys;
  # Keys with a typed option (or set through tls.*): never in `settings`.
  ownedKeys = builtins.attrNames typedKeys ++ lib.mapAttrsToList (_: f: f.key) tlsFileKeys;
  clashingKeys = lib.filter (key: cfg.settings ? ${key}) ownedKeys;

  renderedFile = settingsFormat.generate "kvraft.toml" (typedSettings // cfg.settings);

  # The file the system installs: the rendered one, once kvraftd has read it
  # with the unit's environment and accepted every key and value (the TLS
  # files need not exist for that). Skipped when the build machine can't run
  # the package (cross-compiling).
  configFile =
    if cfg.checkConfig && pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
      pkgs.runCommandLocal "kvraft.toml" { } ''
        env -i ${lib.escapeShellArgs (map (lib.replaceStrings [ "%d" ] [ "/run/credentials/kvraft.service" ]) tlsEnvironment)} \
          ${cfg.package}/bin/kvraftd --print-config --config ${renderedFile} >/dev/null \
          || { echo "services.kvraft: kvraftd refuses the configuration above (${renderedFile})" >&2; exit 1; }
        cp ${renderedFile} $out
      ''
    else
      renderedFile;

  stateDirectory = lib.removePrefix "/var/lib/" cfg.dataDir;

  openPorts = [
    (portOf cfg.clientAddr)
    (portOf cfg.peerAddr)
  ]
  ++ lib.optional (cfg.metricsAddr != "") (portOf cfg.metricsAddr);
in
{
  options.services.kvraft = {
    enable = lib.mkEnableOption "kvraft, a replicated key-value store node";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.kvraft or (pkgs.callPackage ./package.nix { });
      defaultText = lib.literalExpression "pkgs.kvraft";
      description = ''
        The kvraft package (kvraftd and the kvraft CLI). The flake's overlay
        provides pkgs.kvraft and its nixosModules.default sets the flake's
        build; without either, nix/package.nix is built from this checkout.
      '';
    };

    nodeId = lib.mkOption {
      type = lib.types.ints.positive;
      default = 1;
      example = 2;
      description = "This node's id: positive, unique in the cluster, never reused after a removal (config key `id`). The default 1 suits a single node.";
    };

    clientAddr = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:7379";
      example = "0.0.0.0:7379";
      description = "Where clients connect, HOST:PORT (`client_addr`). A wildcard (0.0.0.0, [::]) needs advertiseClientAddr.";
    };

    peerAddr = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:7380";
      example = "0.0.0.0:7380";
      description = "Where the other nodes connect, HOST:PORT (`peer_addr`). A wildcard (0.0.0.0, [::]) needs advertisePeerAddr.";
    };

    advertiseClientAddr = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "10.0.0.1:7379";
      description = "The client address other nodes and clients dial (`advertise_client_addr`); required when clientAddr is a wildcard. null: clientAddr.";
    };

    advertisePeerAddr = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "10.0.0.1:7380";
      description = "The peer address other nodes dial (`advertise_peer_addr`); required when peerAddr is a wildcard. null: peerAddr.";
    };

    metricsAddr = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:9379";
      example = "0.0.0.0:9379";
      description = "Where /metrics, /health and /ready are served, HOST:PORT (`metrics_addr`); \"\" turns the endpoint off.";
    };

    initialCluster = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.str (lib.types.attrsOf lib.types.str));
      default = null;
      example = {
        "1" = "10.0.0.1:7380";
        "2" = "10.0.0.2:7380";
        "3" = "10.0.0.3:7380";
      };
      description = ''
        The initial members of a new cluster, the same on every initial member:
        an attribute set id -> peer address, or the string "ID=HOST:PORT,...".
        It must list this node at the peer address it advertises. Read only
        while the data directory is empty. null: this node alone.
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
      description = "The data directory (`data_dir`); must be under /var/lib: it is the unit's StateDirectory, owned by its dynamic user, mode 0700.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = {
        snapshot_threshold = 50000;
        log_filter = "info,raft=warn";
      };
      description = ''
        Further kvraftd configuration keys (see packaging/kvraft.example.toml),
        rendered with the typed options to /etc/kvraft/kvraft.toml. A key that
        has a typed option (id, data_dir, the addresses, initial_cluster, join,
        the TLS keys) is refused here: set the option. Unknown keys and bad
        values fail the build when checkConfig is on.
      '';
    };

    checkConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Run the rendered configuration through `kvraftd --print-config` when
        the system is built, so a key or value kvraftd would refuse fails
        `nixos-rebuild` instead of the unit.
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
        type = lib.types.nullOr (
          lib.types.either lib.types.str (
            lib.types.attrsOf (
              lib.types.enum [
                "read"
                "write"
                "admin"
              ]
            )
          )
        );
        default = null;
        example = {
          admin = "admin";
          app = "write";
          dashboard = "read";
        };
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

    backup = {
      enable = lib.mkEnableOption "periodic backups with `kvraft snapshot save` into /var/lib/kvraft-backup/latest.kvsnap (replaced only by a complete, checked backup)";
      interval = lib.mkOption {
        type = lib.types.str;
        default = "hourly";
        example = "*-*-* 00/6:00:00";
        description = "When to take a backup (a systemd OnCalendar= expression).";
      };
      endpoint = lib.mkOption {
        type = lib.types.str;
        default = if cfg.advertiseClientAddr != null then cfg.advertiseClientAddr else cfg.clientAddr;
        defaultText = lib.literalExpression "config.services.kvraft.advertiseClientAddr or clientAddr";
        description = "The node the backup is taken from (HOST:PORT of its client port).";
      };
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the client, peer and metrics ports in the firewall: on firewallInterfaces, or on every interface if that is empty.";
    };

    firewallInterfaces = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "eth1" ];
      description = ''
        The interfaces on which openFirewall opens the ports, e.g. the private
        network the nodes share. Empty: every interface, which exposes the peer
        port to every network the host is on (a warning says so unless peer
        TLS is on).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.hasPrefix "/var/lib/" cfg.dataDir && builtins.match "[A-Za-z0-9._/-]+" stateDirectory != null;
        message = "services.kvraft.dataDir (${cfg.dataDir}) must be a directory under /var/lib: it is the unit's StateDirectory.";
      }
      {
        assertion = !(cfg.backup.enable && tls.certFile != null);
        message = "services.kvraft.backup does not yet pass a client certificate: with client TLS on, run kvraft snapshot save from a unit of your own with KVRAFT_CACERT, KVRAFT_CERT and KVRAFT_KEY (an admin client certificate).";
      }
      {
        assertion = clashingKeys == [ ];
        message = "services.kvraft.settings sets ${lib.concatStringsSep ", " clashingKeys}: these keys have typed options (nodeId, dataDir, clientAddr, peerAddr, metricsAddr, advertise*Addr, initialCluster, join, tls.*); set them there, so each has one source.";
      }
    ]
    ++ map
      (
        { name, value }:
        {
          assertion = isHostPort value;
          message = "services.kvraft.${name} = \"${value}\" is not HOST:PORT (a host name or IP address, then a port 0-65535; IPv6 as [::1]:7380).";
        }
      )
      (
        [
          {
            name = "clientAddr";
            value = cfg.clientAddr;
          }
          {
            name = "peerAddr";
            value = cfg.peerAddr;
          }
        ]
        ++ lib.optional (cfg.metricsAddr != "") {
          name = "metricsAddr";
          value = cfg.metricsAddr;
        }
        ++ lib.optional (cfg.advertiseClientAddr != null) {
          name = "advertiseClientAddr";
          value = cfg.advertiseClientAddr;
        }
        ++ lib.optional (cfg.advertisePeerAddr != null) {
          name = "advertisePeerAddr";
          value = cfg.advertisePeerAddr;
        }
      )
    ++ [
      {
        assertion = !(isWildcard cfg.clientAddr && cfg.advertiseClientAddr == null);
        message = "services.kvraft.clientAddr = \"${cfg.clientAddr}\" listens on every interface, so it needs advertiseClientAddr: the address other nodes and clients should dial.";
      }
      {
        assertion = !(isWildcard cfg.peerAddr && cfg.advertisePeerAddr == null);
        message = "services.kvraft.peerAddr = \"${cfg.peerAddr}\" listens on every interface, so it needs advertisePeerAddr: the address other nodes should dial.";
      }
      {
        assertion = !(cfg.join && cfg.initialCluster != null);
        message = "services.kvraft: join and initialCluster exclude each other (a joining node learns the members from the cluster).";
      }
      {
        assertion = initialMembers != [ ];
        message = "services.kvraft.initialCluster is empty; give ID = \"HOST:PORT\" for every initial member, this node included, or leave it null for a one-node cluster.";
      }
      {
        assertion = badMembers == [ ];
        message = "services.kvraft.initialCluster: ${lib.concatMapStringsSep ", " (m: "\"${m.id}=${m.addr}\"") badMembers} is not ID=HOST:PORT with a positive id.";
      }
      {
        assertion = initialMembers == null || initialMembers == [ ] || ownEntries != [ ];
        message = "services.kvraft.initialCluster does not list this node (nodeId ${toString cfg.nodeId}); list every initial member, this one included.";
      }
      {
        assertion = lib.length ownEntries <= 1;
        message = "services.kvraft.initialCluster names node ${toString cfg.nodeId} more than once.";
      }
      {
        assertion = ownEntries == [ ] || advertisedPeer == null || (lib.head ownEntries).addr == advertisedPeer;
        message = "services.kvraft.initialCluster gives node ${toString cfg.nodeId} the peer address ${
          if ownEntries == [ ] then "" else (lib.head ownEntries).addr
        }, but this node advertises ${toString advertisedPeer}; make them agree (peerAddr / advertisePeerAddr).";
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
        assertion = tls.clientCertAuth -> has "ca.pem";
        message = "services.kvraft.tls.clientCertAuth needs trustedCaFile (the CA that signs client certificates) and certFile/keyFile.";
      }
      {
        assertion = clientRolesString != null -> tls.clientCertAuth;
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
        assertion = tls.metricsTls -> has "cert.pem";
        message = "services.kvraft.tls.metricsTls needs certFile and keyFile: they serve the metrics endpoint too.";
      }
    ];

    warnings =
      lib.optional (cfg.openFirewall && cfg.firewallInterfaces == [ ] && !peerTls)
        "services.kvraft: openFirewall opens the peer port ${toString (portOf cfg.peerAddr)} on every interface and peer TLS is off, so anyone who can reach it from a member's address can speak for that member. Set services.kvraft.firewallInterfaces to the nodes' private network, or turn on peer TLS (tls.peerCertFile, peerKeyFile, peerTrustedCaFile).";

    environment.systemPackages = [ cfg.package ];
    environment.etc."kvraft/kvraft.toml".source = configFile;

    networking.firewall = lib.mkIf cfg.openFirewall (
      if cfg.firewallInterfaces == [ ] then
        { allowedTCPPorts = openPorts; }
      else
        {
          interfaces = lib.genAttrs cfg.firewallInterfaces (_: {
            allowedTCPPorts = openPorts;
          });
        }
    );

    systemd.services.kvraft-backup = lib.mkIf cfg.backup.enable {
      description = "kvraft backup (kvraft snapshot save)";
      after = [
        "network-online.target"
        "kvraft.service"
      ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${cfg.package}/bin/kvraft --endpoints ${cfg.backup.endpoint} --timeout 30s snapshot save /var/lib/kvraft-backup/latest.kvsnap";
        DynamicUser = true;
        StateDirectory = "kvraft-backup";
        StateDirectoryMode = "0700";
        UMask = "0077";
      }
      // sandboxing;
    };

    systemd.timers.kvraft-backup = lib.mkIf cfg.backup.enable {
      description = "Periodic kvraft backup";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.backup.interval;
        Persistent = true;
        RandomizedDelaySec = "5m";
      };
    };

    systemd.services.kvraft = {
      description = "kvraft node (replicated key-value store on Raft)";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      restartTriggers = [ configFile ];

      # A crash loop gives up after 5 starts in 2 minutes (with RestartSec=5s
      # the default 5 starts in 10 s could never be reached).
      startLimitIntervalSec = 120;
      startLimitBurst = 5;

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/kvraftd --config /etc/kvraft/kvraft.toml";
        # SIGHUP re-reads the configuration, applies a new log_filter and
        # re-reads the TLS files: the copies in the credentials directory,
        # made at start, so renewed files need a restart.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        # Only the TLS file keys come from the environment (they point into
        # the credentials directory); everything else is in the file.
        Environment = tlsEnvironment;
        # systemd (root) copies each file at start into a directory only the
        # dynamic user can read: the keys can stay root-only on the host.
        LoadCredential = lib.mapAttrsToList (name: f: "${name}:${f.path}") tlsFiles;
        Restart = "on-failure";
        RestartSec = "5s";
        # A configuration error would fail the same way again: the unit fails
        # at once and the journal says which setting to fix.
        RestartPreventExitStatus = exitConfig;
        # Pinged at half the interval, only while the raft loop progresses.
        WatchdogSec = "30s";
        # Above shutdown_timeout_ms (default 10 s): handover, drain, final checkpoint.
        TimeoutStopSec = "30s";
        LimitNOFILE = 65536;

        DynamicUser = true;
        StateDirectory = stateDirectory;
        StateDirectoryMode = "0700";
        UMask = "0077";
      }
      // sandboxing;
    };
  };
}
