# Four NixOS VMs, one kvraft node each, with TLS on the client, peer and
# metrics ports and client roles. node1..3 form a cluster from a static
# initialCluster; node4 starts with join = true and is added with
# `kvraft add-node`. The test writes through one node and reads through the
# others, checks refusals (plaintext client, read-only identity), reads
# metrics over HTTPS across the network, stops a node cleanly (exit status 0),
# restarts a lagging node, and stops and starts the whole cluster: every
# acknowledged write is still there.
#
# Needs KVM: nix build .#vm-test -L
{ pkgs, self }:

let
  kvraft = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
  # A test-only PKI from `kvraft certs init`. Its keys end up in the
  # world-readable store, which is acceptable for throwaway VMs only; real
  # keys stay on the host (services.kvraft.tls.keyFile rejects store paths).
  pki = pkgs.runCommand "kvraft-test-pki" { nativeBuildInputs = [ kvraft ]; } ''
    kvraft certs init $out --nodes 1=node1,2=node2,3=node3,4=node4 --clients admin,reader
  '';
  cluster = {
    "1" = "node1:7380";
    "2" = "node2:7380";
    "3" = "node3:7380";
  };
  node =
    id: extra:
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];
      # As an administrator would place them: root-only copies on the host
      # (mode makes etc copy the file instead of linking into the store).
      environment.etc = {
        "kvraft/tls/ca.pem".source = "${pki}/ca.pem";
        "kvraft/tls/node.pem".source = "${pki}/node-${toString id}.pem";
        "kvraft/tls/node.key" = {
          source = "${pki}/node-${toString id}.key";
          mode = "0400";
        };
      };
      environment.systemPackages = [ pkgs.curl ];
      virtualisation.memorySize = 768;
      services.kvraft = {
        enable = true;
        nodeId = id;
        clientAddr = "0.0.0.0:7379";
        peerAddr = "0.0.0.0:7380";
        metricsAddr = "0.0.0.0:9379";
        # The test driver puts every node's name in /etc/hosts.
        advertiseClientAddr = "node${toString id}:7379";
        advertisePeerAddr = "node${toString id}:7380";
        openFirewall = true;
        # The test network; eth0 is the driver's user-mode network.
        firewallInterfaces = [ "eth1" ];
        settings.log_filter = "info";
        tls = {
          certFile = "/etc/kvraft/tls/node.pem";
          keyFile = "/etc/kvraft/tls/node.key";
          trustedCaFile = "/etc/kvraft/tls/ca.pem";
          clientCertAuth = true;
          clientRoles = {
            admin = "admin";
            reader = "read";
          };
          peerCertFile = "/etc/kvraft/tls/node.pem";
          peerKeyFile = "/etc/kvraft/tls/node.key";
          peerTrustedCaFile = "/etc/kvraft/tls/ca.pem";
          metricsTls = true;
        };
      } // extra;
    };
in
pkgs.testers.runNixOSTest {
  name = "kvraft-cluster";

  nodes = {
    node1 = node 1 { initialCluster = cluster; };
    node2 = node 2 { initialCluster = cluster; };
    node3 = node 3 { initialCluster = cluster; };
    node4 = node 4 { join = true; };
  };

  testScript = ''
    tls = "--cacert ${pki}/ca.pem --cert ${pki}/client-admin.pem --key ${pki}/client-admin.key"
    reader = "--cacert ${pki}/ca.pem --cert ${pki}/client-reader.pem --key ${pki}/client-reader.key"
    kv = f"kvraft {tls}"
    endpoints = "--endpoints node1:7379,node2:7379,node3:7379"
    initial = [node1, node2, node3]
    everyone = initial + [node4]

    def leader_elected(nodes_arg):
        # grep without -q reads all of the CLI's output: no SIGPIPE under pipefail.
        node1.wait_until_succeeds(f"{kv} {nodes_arg} members | grep leader >/dev/null", timeout=90)

    def stop_cleanly(m):
        m.succeed("systemctl stop kvraft")
        result = m.succeed("systemctl show kvraft -p Result --value").strip()
        status = m.succeed("systemctl show kvraft -p ExecMainStatus --value").strip()
        assert (result, status) == ("success", "0"), f"{m.name}: Result={result} ExecMainStatus={status}"

    start_all()
    for m in everyone:
        # READY=1 does not wait for a leader (nor, on node4, to be added).
        m.wait_for_unit("kvraft.service")
        m.wait_for_open_port(7379)

    with subtest("the initial members elect a leader over mutual TLS"):
        leader_elected(endpoints)
        print(node1.succeed(f"{kv} {endpoints} members"))

    with subtest("set through one node, get through each"):
        node1.succeed(f"{kv} --endpoints node1:7379 set greeting hello")
        for m in initial:
            out = m.succeed(f"{kv} --endpoints {m.name}:7379 get greeting").strip()
            assert out == "hello", f"{m.name}: got {out!r}"

    with subtest("a plaintext client and a read-only identity are refused"):
        status, out = node1.execute("kvraft --endpoints node2:7379 ping 2>&1")
        assert status == 2 and "TLS" in out, f"plaintext client: exit {status}: {out}"
        node1.succeed(f"kvraft {reader} --endpoints node2:7379 get greeting")
        status, out = node1.execute(f"kvraft {reader} --endpoints node2:7379 set greeting no 2>&1")
        assert status == 4, f"reader's write: exit {status}: {out}"
        status, out = node1.execute(f"kvraft {reader} {endpoints} add-node 9 node9:7380 2>&1")
        assert status == 4, f"reader's add-node: exit {status}: {out}"

    with subtest("node4 joins: kvraft add-node, then it serves the data"):
        node1.succeed(f"{kv} {endpoints} add-node 4 node4:7380 --client-addr node4:7379")
        node4.wait_until_succeeds(
            f"test \"$({kv} --endpoints node4:7379 --serializable get greeting)\" = hello", timeout=90
        )
        # Promoted from learner to voter once caught up.
        node1.wait_until_succeeds(f"{kv} {endpoints} members | grep '^4 ' | grep -v learner >/dev/null", timeout=90)
        print(node1.succeed(f"{kv} {endpoints} members"))

    with subtest("the keys reach the dynamic user only as credentials"):
        node1.succeed("test \"$(stat -c %a /etc/kvraft/tls/node.key)\" = 400")
        node1.succeed("test -f /run/credentials/kvraft.service/key.pem")
        node1.succeed("test \"$(systemctl show kvraft -p RestartPreventExitStatus --value)\" = 78")

    with subtest("metrics over HTTPS, across the network, on the firewalled interface"):
        out = node1.succeed("curl -fsS --cacert ${pki}/ca.pem https://node2:9379/metrics")
        assert "kvraft_term" in out and "kvraft_is_leader" in out, out[:500]
        node1.succeed("curl -fsS --cacert ${pki}/ca.pem https://node4:9379/ready")

    with subtest("the unit is sandboxed, reports status and reloads"):
        node1.succeed("systemctl show kvraft -p StatusText --value | grep term >/dev/null")
        node1.succeed("test \"$(stat -c %a /var/lib/private/kvraft)\" = 700")
        pid = node1.succeed("systemctl show kvraft -p MainPID --value").strip()
        node1.succeed(f"grep -q '^NoNewPrivs:[[:space:]]*1' /proc/{pid}/status")
        node1.succeed(f"grep -q '^CapEff:[[:space:]]*0000000000000000' /proc/{pid}/status")
        node1.succeed(f"test \"$(stat -c %u /proc/{pid})\" != 0")
        node1.succeed("systemctl reload kvraft")
        node1.succeed("systemctl is-active kvraft")
        node1.succeed(f"{kv} --endpoints node1:7379 ping")

    with subtest("a clean stop exits 0; the stopped node catches up after a start"):
        stop_cleanly(node3)
        node1.succeed(f"{kv} --endpoints node1:7379,node2:7379,node4:7379 set greeting again")
        node3.succeed("systemctl start kvraft")
        node3.wait_for_unit("kvraft.service")
        node3.wait_until_succeeds(
            f"test \"$({kv} --endpoints node3:7379 --serializable get greeting)\" = again", timeout=90
        )

    with subtest("the whole cluster stops and starts again with every write"):
        for i in range(20):
            node1.succeed(f"{kv} {endpoints} set key{i} value{i}")
        for m in everyone:
            stop_cleanly(m)
        for m in everyone:
            m.succeed("systemctl start kvraft")
        for m in everyone:
            m.wait_for_unit("kvraft.service")
        leader_elected("--endpoints node1:7379,node2:7379,node3:7379,node4:7379")
        for i in range(20):
            out = node2.succeed(f"{kv} --endpoints node2:7379,node4:7379 get key{i}").strip()
            assert out == f"value{i}", f"key{i}: got {out!r}"
        out = node4.succeed(f"{kv} --endpoints node4:7379 get greeting").strip()
        assert out == "again", f"greeting: got {out!r}"
  '';
}
