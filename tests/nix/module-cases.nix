# services.kvraft settings, each a set of options, shared by two checks:
#  - tests/nix_packaging.rs evaluates them here with nixpkgs' lib.evalModules
#    and stand-ins (tests/nix/eval-module.nix), runs each rendered file
#    through the real kvraftd, and runs kvraftd on the bad ones too, to show
#    that every assertion stands for a refusal of the daemon;
#  - the flake's checks.module evaluates them as real NixOS systems and builds
#    each good configuration file (which runs kvraftd --print-config on it).
let
  tls = {
    certFile = "/etc/kvraft/tls/node.pem";
    keyFile = "/etc/kvraft/tls/node.key";
    trustedCaFile = "/etc/kvraft/tls/ca.pem";
    clientCertAuth = true;
    clientRoles = {
      admin = "admin";
      app = "write";
      dashboard = "read";
    };
    peerCertFile = "/etc/kvraft/tls/node.pem";
    peerKeyFile = "/etc/kvraft/tls/node.key";
    peerTrustedCaFile = "/etc/kvraft/tls/ca.pem";
    metricsTls = true;
  };
in
{
  # Settings kvraftd accepts: each must evaluate without a failed assertion,
  # and kvraftd must read back every key the module rendered.
  good = {
    # `enable = true` alone: a one-node cluster on loopback.
    defaults = { };

    static-cluster = {
      nodeId = 2;
      clientAddr = "0.0.0.0:7379";
      peerAddr = "0.0.0.0:7380";
      metricsAddr = "0.0.0.0:9379";
      advertiseClientAddr = "10.0.0.2:7379";
      advertisePeerAddr = "10.0.0.2:7380";
      initialCluster = {
        "1" = "10.0.0.1:7380";
        "2" = "10.0.0.2:7380";
        "3" = "10.0.0.3:7380";
      };
      openFirewall = true;
      firewallInterfaces = [ "eth1" ];
      settings = {
        snapshot_threshold = 50000;
        log_filter = "info,raft=warn";
        request_timeout_ms = 3000;
      };
    };

    backups = {
      backup.enable = true;
      backup.interval = "daily";
    };

    cluster-as-string = {
      nodeId = 3;
      peerAddr = "[::1]:7382";
      clientAddr = "[::1]:7381";
      initialCluster = " 1=[::1]:7380, 3=[::1]:7382 ,2=[::1]:7384";
      dataDir = "/var/lib/kvraft-3";
      metricsAddr = "";
    };

    # The peer port open on every interface without peer TLS: allowed, with
    # a warning.
    open-firewall-everywhere = {
      openFirewall = true;
    };

    joining = {
      nodeId = 4;
      join = true;
      peerAddr = "10.0.0.4:7380";
      clientAddr = "10.0.0.4:7379";
      checkConfig = false;
    };

    tls = {
      nodeId = 1;
      initialCluster = "1=127.0.0.1:7380";
      openFirewall = true;
      inherit tls;
    };
  };

  # Settings kvraftd would refuse (or that would break the unit): each must
  # fail evaluation with `message` among the failed assertions.
  # `daemonRefuses`: kvraftd, given the rendered file and the unit's
  # environment, exits 78 with `daemonSays` in its error.
  bad = {
    wildcard-client-without-advertise = {
      options.clientAddr = "0.0.0.0:7379";
      message = "clientAddr = \"0.0.0.0:7379\" listens on every interface, so it needs advertiseClientAddr";
      daemonSays = "needs advertise_client_addr";
    };
    wildcard-peer-without-advertise = {
      options = {
        peerAddr = "[::]:7380";
        initialCluster = {
          "1" = "[::]:7380";
        };
      };
      message = "peerAddr = \"[::]:7380\" listens on every interface, so it needs advertisePeerAddr";
      daemonSays = "needs advertise_peer_addr";
    };
    initial-cluster-without-this-node = {
      options = {
        nodeId = 5;
        initialCluster = {
          "1" = "10.0.0.1:7380";
          "2" = "10.0.0.2:7380";
        };
      };
      message = "initialCluster does not list this node (nodeId 5)";
      daemonSays = "does not list this node (id 5)";
    };
    initial-cluster-with-another-address = {
      options = {
        peerAddr = "10.0.0.1:7380";
        initialCluster = {
          "1" = "10.0.0.9:7380";
          "2" = "10.0.0.2:7380";
        };
      };
      message = "gives node 1 the peer address 10.0.0.9:7380, but this node advertises 10.0.0.1:7380";
      daemonSays = "gives node 1 the peer address 10.0.0.9:7380, but this node advertises 10.0.0.1:7380";
    };
    initial-cluster-with-another-advertised-address = {
      options = {
        peerAddr = "0.0.0.0:7380";
        advertisePeerAddr = "node1:7380";
        initialCluster = "1=node1:7390";
      };
      message = "gives node 1 the peer address node1:7390, but this node advertises node1:7380";
      daemonSays = "but this node advertises node1:7380";
    };
    initial-cluster-empty-set = {
      options.initialCluster = { };
      message = "initialCluster is empty";
      daemonSays = "initial_cluster (from TOML file";
    };
    initial-cluster-empty-string = {
      options.initialCluster = "";
      message = "initialCluster is empty";
      daemonSays = "is empty";
    };
    initial-cluster-malformed = {
      options.initialCluster = "1=127.0.0.1:7380,two=10.0.0.2:7380";
      message = "\"two=10.0.0.2:7380\" is not ID=HOST:PORT";
      daemonSays = "the id must be a positive integer";
    };
    join-and-initial-cluster = {
      options = {
        join = true;
        initialCluster = {
          "1" = "127.0.0.1:7380";
        };
      };
      message = "join and initialCluster exclude each other";
      daemonSays = "exclude each other";
    };
    address-without-port = {
      options.clientAddr = "localhost";
      message = "clientAddr = \"localhost\" is not HOST:PORT";
      daemonSays = "expected HOST:PORT";
    };
    port-out-of-range = {
      options.metricsAddr = "127.0.0.1:70000";
      message = "metricsAddr = \"127.0.0.1:70000\" is not HOST:PORT";
      daemonSays = "port \"70000\" is not a number";
    };
    cert-without-key = {
      options.tls.certFile = "/etc/kvraft/tls/node.pem";
      message = "certFile and keyFile go together";
      daemonSays = "cert_file (from environment variable KVRAFT_CERT_FILE) needs key_file too";
    };
    client-cert-auth-without-ca = {
      options.tls = {
        certFile = "/etc/kvraft/tls/node.pem";
        keyFile = "/etc/kvraft/tls/node.key";
        clientCertAuth = true;
      };
      message = "clientCertAuth needs trustedCaFile";
      daemonSays = "client_cert_auth (from TOML file";
    };
    client-roles-without-client-cert-auth = {
      options.tls = {
        certFile = "/etc/kvraft/tls/node.pem";
        keyFile = "/etc/kvraft/tls/node.key";
        clientRoles.admin = "admin";
      };
      message = "clientRoles needs clientCertAuth";
      daemonSays = "needs client_cert_auth";
    };
    two-of-three-peer-files = {
      options.tls = {
        peerCertFile = "/etc/kvraft/tls/node.pem";
        peerKeyFile = "/etc/kvraft/tls/node.key";
      };
      message = "peerCertFile, peerKeyFile and peerTrustedCaFile go together";
      daemonSays = "needs peer_trusted_ca_file too";
    };
    metrics-tls-without-cert = {
      options.tls.metricsTls = true;
      message = "metricsTls needs certFile and keyFile";
      daemonSays = "metrics_tls (from TOML file";
    };
    # TLS files go through tls.* (credentials), never the world-readable file.
    cert-file-in-settings = {
      options.settings.cert_file = "/etc/kvraft/tls/node.pem";
      message = "services.kvraft.settings sets cert_file: these keys have typed options";
      daemonSays = "cert_file (from TOML file";
    };
    # Refused by the module only: kvraftd would run, but not as intended.
    data-dir-in-settings = {
      options.settings.data_dir = "/srv/kvraft";
      message = "services.kvraft.settings sets data_dir: these keys have typed options";
      daemonSays = null;
    };
    data-dir-outside-var-lib = {
      options.dataDir = "/srv/kvraft";
      message = "dataDir (/srv/kvraft) must be a directory under /var/lib";
      daemonSays = null;
    };
  };
}
