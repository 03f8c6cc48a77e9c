// Starts one OpenSearch 2.19 node for the tests, with its plugins taken from
// the classpath (the jars `install` copied) instead of from modules/ and
// plugins/ folders of a distribution, which this machine cannot download.
//
// Why not org.opensearch.bootstrap.OpenSearch: its Bootstrap refuses to run
// as root (we are root here), installs a SecurityManager whose policy expects
// the distribution's layout, and runs JarHell and the production bootstrap
// checks (mmap count, file descriptors, heap = max heap...), none of which
// a throwaway test node on loopback should fail on. Node itself has none of
// that; the test framework's MockNode subclasses it the same way.
//
// Usage: java -cp 'DIR/lib/*' Launcher DIR HTTP_PORT TRANSPORT_PORT [key=value...]
// Extra key=value arguments become node settings (they win over ours).

import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.logging.log4j.LogManager;
import org.apache.logging.log4j.core.LoggerContext;
import org.apache.logging.log4j.core.config.Configurator;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.index.reindex.ReindexPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

public final class Launcher {

    // The bundled plugins a test needs: HTTP and transport (netty4), the
    // by-query APIs and _reindex (reindex), scripts in _update_by_query
    // (painless), and the standard analyzers/tokenizers (analysis-common).
    private static final List<Class<? extends Plugin>> PLUGINS = List.of(
        Netty4Plugin.class,
        ReindexPlugin.class,
        PainlessPlugin.class,
        CommonAnalysisPlugin.class
    );

    // Node's constructor that takes classpath plugins is protected.
    private static final class ClasspathNode extends Node {
        ClasspathNode(Environment environment) {
            // false: the tests may create indices with private settings
            // (index.version.created and the like), as MockNode allows.
            super(environment, PLUGINS, false);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: Launcher DIR HTTP_PORT TRANSPORT_PORT [key=value...]");
            System.exit(2);
        }
        Path dir = Path.of(args[0]).toAbsolutePath();
        Path config = dir.resolve("config");
        Path logs = dir.resolve("logs");
        for (Path p : List.of(config, logs, dir.resolve("data"), dir.resolve("plugins"), dir.resolve("modules"), dir.resolve("tmp"))) {
            Files.createDirectories(p);
        }
        // LogConfigurator reads every log4j2*.properties in the config dir;
        // ours sends everything to files under DIR/logs and nothing to stdout.
        try (InputStream in = Launcher.class.getResourceAsStream("/reentry-log4j2.properties")) {
            Files.copy(in, config.resolve("log4j2.properties"), StandardCopyOption.REPLACE_EXISTING);
        }

        Settings.Builder settings = Settings.builder()
            .put("cluster.name", "reentry-test")
            .put("node.name", "reentry-test-node")
            .put("path.home", dir.toString())
            .put("path.data", dir.resolve("data").toString())
            .put("path.logs", logs.toString())
            .put("network.host", "127.0.0.1")
            .put("http.port", args[1])
            .put("transport.port", args[2])
            .put("http.type", "netty4")
            .put("transport.type", "netty4")
            .put("discovery.type", "single-node")
            // A nearly full disk must not turn the tests' indexes read-only
            // or leave shards unassigned.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            // Nothing to lock or filter for a throwaway node.
            .put("bootstrap.memory_lock", false)
            .put("bootstrap.system_call_filter", false);
        for (int i = 3; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            if (eq <= 0) {
                System.err.println("not a key=value setting: " + args[i]);
                System.exit(2);
            }
            settings.put(args[i].substring(0, eq), args[i].substring(eq + 1));
        }

        // LogConfigurator turns System.err into a logger: keep the real one,
        // so the reason a node died is one line in DIR/opensearch.out,
        // which `start` shows before the log's long tail of stack frames.
        PrintStream stderr = System.err;
        try {
            run(settings.build(), config);
        } catch (Throwable t) {
            stderr.println("reentry launcher: the node failed: " + t);
            LogManager.getLogger(Launcher.class).error("the node failed", t);
            Configurator.shutdown((LoggerContext) LogManager.getContext(false));
            System.exit(1);
        }
    }

    private static void run(Settings settings, Path config) throws Exception {
        Environment env = InternalSettingsPreparer.prepareEnvironment(
            settings, Collections.emptyMap(), config, () -> "reentry-test-node");
        LogConfigurator.registerErrorListener();
        LogConfigurator.setNodeName(Node.NODE_NAME_SETTING.get(env.settings()));
        LogConfigurator.configure(env);

        Node node = new ClasspathNode(env);
        CountDownLatch stopped = new CountDownLatch(1);
        // SIGTERM runs this: close the node so shards are flushed and the
        // data dir is unlocked, then flush the logs (log4j's own hook is off,
        // -Dlog4j.shutdownHookEnabled=false, so it cannot close them first).
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                if (node.awaitClose(15, TimeUnit.SECONDS) == false) {
                    LogManager.getLogger(Launcher.class).warn("node did not stop within 15s");
                }
            } catch (IOException | InterruptedException e) {
                LogManager.getLogger(Launcher.class).warn("closing the node failed", e);
            } finally {
                Configurator.shutdown((LoggerContext) LogManager.getContext(false));
                stopped.countDown();
            }
        }, "reentry-opensearch-shutdown"));

        node.start();
        LogManager.getLogger(Launcher.class).info("reentry launcher: node started");
        // OpenSearch's threads are daemons: this keeps the JVM up until SIGTERM.
        stopped.await();
    }
}
