// A real Quartz 2.3 scheduler (Debian's libquartz2-java) with its JDBC job
// store on PostgreSQL, for the tests and the demo: the peer that reentry's
// Quartz gate must hold against. Every job run appends one line to a run
// log, which is the evidence the tests count, not reentry's own word.
//
//   QuartzLab schema                 prints Quartz's own tables_postgres.sql
//   QuartzLab run KEY=VALUE...       starts a clustered scheduler, then takes
//                                    commands on stdin, one per line, and
//                                    answers each with "ok ..." or "error ..."
//
// Settings for `run`: url, user, password (JDBC), scheduler, instance,
// threads, misfire-threshold (ms), log (the run log), job-ms (how long a job
// runs), prefix (table prefix, default QRTZ_).
//
// Commands:
//   simple GROUP NAME INTERVAL_MS [START_DELAY_MS]   a trigger repeating forever
//   cron GROUP NAME EXPRESSION...                   a cron trigger
//   pause-trigger GROUP NAME | pause-group GROUP    what an application does itself
//   state GROUP NAME                                the trigger's state as Quartz reports it
//   quit
//
// A job whose name starts with "serial" disallows concurrent execution; one
// whose name starts with "recoverable" requests recovery (Quartz re-runs it
// after its scheduler dies mid-run).
//
// Run log line: fire-ms scheduled-ms start-ms TRIGGER-GROUP.NAME instance
// JOB-GROUP.NAME recovering (true for a run Quartz re-fires after a failure)

import java.io.BufferedReader;
import java.io.FileWriter;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import java.util.Date;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;

import org.quartz.CronScheduleBuilder;
import org.quartz.DisallowConcurrentExecution;
import org.quartz.Job;
import org.quartz.JobBuilder;
import org.quartz.JobDetail;
import org.quartz.JobExecutionContext;
import org.quartz.Scheduler;
import org.quartz.SimpleScheduleBuilder;
import org.quartz.Trigger;
import org.quartz.TriggerBuilder;
import org.quartz.TriggerKey;
import org.quartz.impl.StdSchedulerFactory;
import org.quartz.impl.matchers.GroupMatcher;

public final class QuartzLab {
    private static Writer runLog;
    private static long jobMillis = 20;
    private static String instance = "lab";

    /** Logs each run; overlapping runs of one job are allowed. */
    public static class LogJob implements Job {
        @Override
        public void execute(JobExecutionContext ctx) {
            record(ctx);
        }
    }

    /** The same, but Quartz blocks its triggers while it runs. */
    @DisallowConcurrentExecution
    public static class SerialJob implements Job {
        @Override
        public void execute(JobExecutionContext ctx) {
            record(ctx);
        }
    }

    private static void record(JobExecutionContext ctx) {
        long start = System.currentTimeMillis();
        TriggerKey k = ctx.getTrigger().getKey();
        org.quartz.JobKey j = ctx.getJobDetail().getKey();
        Date scheduled = ctx.getScheduledFireTime();
        String line = ctx.getFireTime().getTime() + " "
                + (scheduled == null ? 0 : scheduled.getTime()) + " "
                + start + " " + k.getGroup() + "." + k.getName() + " " + instance + " "
                + j.getGroup() + "." + j.getName() + " " + ctx.isRecovering() + "\n";
        synchronized (QuartzLab.class) {
            try {
                runLog.write(line);
                runLog.flush();
            } catch (IOException e) {
                throw new RuntimeException(e);
            }
        }
        try {
            Thread.sleep(jobMillis);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length >= 1 && args[0].equals("schema")) {
            try (InputStream in = Scheduler.class.getResourceAsStream(
                    "/org/quartz/impl/jdbcjobstore/tables_postgres.sql")) {
                if (in == null) {
                    System.err.println("tables_postgres.sql is not in the Quartz jar");
                    System.exit(2);
                }
                System.out.write(in.readAllBytes());
                System.out.flush();
            }
            return;
        }
        if (args.length < 1 || !args[0].equals("run")) {
            System.err.println("usage: QuartzLab schema | QuartzLab run KEY=VALUE...");
            System.exit(64);
        }
        Map<String, String> opt = new HashMap<>();
        for (int i = 1; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            if (eq < 0) {
                System.err.println("not KEY=VALUE: " + args[i]);
                System.exit(64);
            }
            opt.put(args[i].substring(0, eq), args[i].substring(eq + 1));
        }
        instance = opt.getOrDefault("instance", "lab");
        jobMillis = Long.parseLong(opt.getOrDefault("job-ms", "20"));
        runLog = new FileWriter(opt.get("log"), StandardCharsets.UTF_8, true);

        Properties p = new Properties();
        p.setProperty("org.quartz.scheduler.instanceName", opt.get("scheduler"));
        p.setProperty("org.quartz.scheduler.instanceId", instance);
        p.setProperty("org.quartz.threadPool.threadCount", opt.getOrDefault("threads", "10"));
        // Acquire and fire up to 10 triggers per round trip, as busy
        // schedulers are configured: one at a time, Quartz's default, cannot
        // keep up with 100 fires a second on a small machine.
        p.setProperty("org.quartz.scheduler.batchTriggerAcquisitionMaxCount", opt.getOrDefault("batch", "10"));
        p.setProperty("org.quartz.jobStore.class", "org.quartz.impl.jdbcjobstore.JobStoreTX");
        p.setProperty("org.quartz.jobStore.driverDelegateClass",
                "org.quartz.impl.jdbcjobstore.PostgreSQLDelegate");
        p.setProperty("org.quartz.jobStore.tablePrefix", opt.getOrDefault("prefix", "QRTZ_"));
        p.setProperty("org.quartz.jobStore.isClustered", "true");
        p.setProperty("org.quartz.jobStore.clusterCheckinInterval", "1000");
        p.setProperty("org.quartz.jobStore.misfireThreshold",
                opt.getOrDefault("misfire-threshold", "60000"));
        p.setProperty("org.quartz.jobStore.dataSource", "db");
        p.setProperty("org.quartz.dataSource.db.provider", "hikaricp");
        p.setProperty("org.quartz.dataSource.db.driver", "org.postgresql.Driver");
        p.setProperty("org.quartz.dataSource.db.URL", opt.get("url"));
        p.setProperty("org.quartz.dataSource.db.user", opt.getOrDefault("user", "postgres"));
        p.setProperty("org.quartz.dataSource.db.password", opt.getOrDefault("password", ""));
        p.setProperty("org.quartz.dataSource.db.maxConnections", "14");

        // Quartz inserts its lock rows on first use; two of its threads doing
        // so at once on PostgreSQL abort one's transaction ("Failure obtaining
        // db row lock: current transaction is aborted"). Deployments create
        // them beforehand; so does the lab.
        try (java.sql.Connection c = java.sql.DriverManager.getConnection(opt.get("url"),
                    opt.getOrDefault("user", "postgres"), opt.getOrDefault("password", ""));
             java.sql.PreparedStatement st = c.prepareStatement("INSERT INTO "
                    + opt.getOrDefault("prefix", "QRTZ_")
                    + "LOCKS (SCHED_NAME, LOCK_NAME) VALUES (?, ?) ON CONFLICT DO NOTHING")) {
            for (String lock : new String[] {"TRIGGER_ACCESS", "STATE_ACCESS"}) {
                st.setString(1, opt.get("scheduler"));
                st.setString(2, lock);
                st.executeUpdate();
            }
        }
        Scheduler s = new StdSchedulerFactory(p).getScheduler();
        s.start();
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        out.println("ok started " + s.getSchedulerName() + " " + instance);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String[] w = line.trim().split("\\s+");
            try {
                switch (w[0]) {
                    case "simple": {
                        long interval = Long.parseLong(w[3]);
                        long delay = w.length > 4 ? Long.parseLong(w[4]) : 0;
                        schedule(s, w[1], w[2], TriggerBuilder.newTrigger()
                                .withIdentity(w[2], w[1])
                                .startAt(new Date(System.currentTimeMillis() + delay))
                                .withSchedule(SimpleScheduleBuilder.simpleSchedule()
                                        .withIntervalInMilliseconds(interval).repeatForever())
                                .build());
                        out.println("ok " + s.getTriggerState(TriggerKey.triggerKey(w[2], w[1])));
                        break;
                    }
                    case "cron": {
                        String expr = String.join(" ", java.util.Arrays.copyOfRange(w, 3, w.length));
                        schedule(s, w[1], w[2], TriggerBuilder.newTrigger()
                                .withIdentity(w[2], w[1])
                                .withSchedule(CronScheduleBuilder.cronSchedule(expr))
                                .build());
                        out.println("ok " + s.getTriggerState(TriggerKey.triggerKey(w[2], w[1])));
                        break;
                    }
                    case "pause-trigger":
                        s.pauseTrigger(TriggerKey.triggerKey(w[2], w[1]));
                        out.println("ok");
                        break;
                    case "pause-group":
                        s.pauseTriggers(GroupMatcher.triggerGroupEquals(w[1]));
                        out.println("ok");
                        break;
                    case "state":
                        out.println("ok " + s.getTriggerState(TriggerKey.triggerKey(w[2], w[1])));
                        break;
                    case "quit":
                        s.shutdown(true);
                        out.println("ok bye");
                        return;
                    default:
                        out.println("error unknown command " + w[0]);
                }
            } catch (Exception e) {
                out.println("error " + e.getMessage().replace('\n', ' '));
            }
        }
        s.shutdown(true);
    }

    private static void schedule(Scheduler s, String group, String name, Trigger t) throws Exception {
        Class<? extends Job> cls = name.startsWith("serial") ? SerialJob.class : LogJob.class;
        JobDetail job = JobBuilder.newJob(cls).withIdentity(name, group)
                .requestRecovery(name.startsWith("recoverable")).build();
        s.scheduleJob(job, t);
    }
}
