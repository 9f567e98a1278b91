// The JVM stand-in for the benchmark (issue 8): NOT the Java Task Runner, but a 40-line Java 17 program
// that does what an idle Task Runner does: long-poll PollForTask for one worker group with an HTTP client,
// over and over. It signs nothing real: datapipeline-local started without --credentials accepts any
// well-formed SigV4 Authorization header. It prints "polling" just before its first poll, so the harness
// can time start-to-first-poll.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.time.ZoneOffset;
import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;

public class JvmPoller {
    public static void main(String[] args) throws Exception {
        String endpoint = args[0];
        String workerGroup = args[1];
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        DateTimeFormatter amzDate = DateTimeFormatter.ofPattern("yyyyMMdd'T'HHmmss'Z'");
        boolean first = true;
        while (true) {
            ZonedDateTime now = ZonedDateTime.now(ZoneOffset.UTC);
            String date = now.format(amzDate);
            String auth = "AWS4-HMAC-SHA256 Credential=AKIDJVMSTANDIN/" + date.substring(0, 8)
                + "/us-east-1/datapipeline/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, "
                + "Signature=" + "0".repeat(64);
            HttpRequest req = HttpRequest.newBuilder(URI.create(endpoint + "/"))
                .timeout(Duration.ofSeconds(120))
                .header("Content-Type", "application/x-amz-json-1.1")
                .header("X-Amz-Target", "DataPipeline.PollForTask")
                .header("X-Amz-Date", date)
                .header("Authorization", auth)
                .POST(HttpRequest.BodyPublishers.ofString(
                    "{\"workerGroup\":\"" + workerGroup + "\",\"hostname\":\"jvm-stand-in\"}"))
                .build();
            if (first) { System.out.println("polling"); System.out.flush(); first = false; }
            HttpResponse<String> resp = client.send(req, HttpResponse.BodyHandlers.ofString());
            if (resp.statusCode() != 200) { System.err.println(resp.statusCode() + " " + resp.body()); Thread.sleep(1000); }
        }
    }
}
