# Three NixOS VMs, one kvraft node each, form a cluster from a static
# initialCluster; the kvraft CLI writes through one node and reads through the
# others; a node restarts and catches up. Run: nix build .#checks.x86_64-linux.vm-test
{ pkgs, self }:

let
  cluster = { "1" = "node1:7380"; "2" = "node2:7380"; "3" = "node3:7380"; };
  node = id: { ... }: {
    imports = [ self.nixosModules.default ];
    services.kvraft = {
      enable = true;
      nodeId = id;
      clientAddr = "0.0.0.0:7379";
      peerAddr = "0.0.0.0:7380";
      # The test driver puts every node's name in /etc/hosts.
      advertiseClientAddr = "node${toString id}:7379";
      advertisePeerAddr = "node${toString id}:7380";
      initialCluster = cluster;
      openFirewall = true;
      settings.log_filter = "info";
    };
  };
in
pkgs.testers.runNixOSTest {
  name = "kvraft-cluster";

  nodes = {
    node1 = node 1;
    node2 = node 2;
    node3 = node 3;
  };

  testScript = ''
    endpoints = "--endpoints node1:7379,node2:7379,node3:7379"
    nodes = [node1, node2, node3]

    start_all()
    for m in nodes:
        # READY=1 does not wait for a leader, so every unit becomes active.
        m.wait_for_unit("kvraft.service")
        m.wait_for_open_port(7379)

    with subtest("the cluster elects a leader"):
        node1.wait_until_succeeds(f"kvraft {endpoints} members | grep -i leader", timeout=60)
        print(node1.succeed(f"kvraft {endpoints} members"))

    with subtest("set through one node, get through each"):
        node1.succeed("kvraft --endpoints node1:7379 set greeting hello")
        for m, name in [(node1, "node1"), (node2, "node2"), (node3, "node3")]:
            out = m.succeed(f"kvraft --endpoints {name}:7379 get greeting").strip()
            assert out == "hello", f"{name}: got {out!r}"

    with subtest("the unit is sandboxed and reports status"):
        node1.succeed("systemctl show kvraft -p StatusText --value | grep -q term")
        node1.succeed("test \"$(stat -c %a /var/lib/private/kvraft)\" = 700")
        node1.succeed("systemctl reload kvraft")
        node1.succeed("systemctl is-active kvraft")

    with subtest("a restarted node catches up"):
        node3.succeed("systemctl stop kvraft")
        node1.succeed(f"kvraft {endpoints} set greeting again")
        node3.succeed("systemctl start kvraft")
        node3.wait_for_unit("kvraft.service")
        node3.wait_until_succeeds(
            "test \"$(kvraft --endpoints node3:7379 --serializable get greeting)\" = again", timeout=60
        )
  '';
}
