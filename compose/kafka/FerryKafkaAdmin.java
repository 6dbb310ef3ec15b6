// SCRAM credentials and ACLs through Kafka's own Admin client (aiokafka has neither API).
// `ferry kafka` runs it from source with the broker's jars on the class path:
//   java -cp 'JARS/*' FerryKafkaAdmin.java < spec.json
// The spec (JSON on stdin, so no password is ever on a command line):
//   {"bootstrap": "HOST:PORT", "client": {Admin client properties},
//    "upsert_scram": [{"user", "password", "mechanism", "iterations"}],
//    "delete_scram": [{"user", "mechanism"}],
//    "delete_acls": [{"principal"} (all its ACLs) or a whole binding as in create_acls],
//    "create_acls": [{"principal", "host", "resource_type", "name", "pattern", "operation",
//                     "permission"}],
//    "describe_acls": true, "describe_users": true}
// Steps run in that order; stdout is one JSON object ({"acls": [...], "users": [...]}),
// a failure is one line on stderr and exit status 1.

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialAlteration;
import org.apache.kafka.clients.admin.UserScramCredentialDeletion;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AccessControlEntryFilter;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourcePatternFilter;
import org.apache.kafka.common.resource.ResourceType;

public class FerryKafkaAdmin {
    public static void main(String[] args) throws Exception {
        ObjectMapper json = new ObjectMapper();
        JsonNode spec = json.readTree(System.in);
        Properties props = new Properties();
        props.put("bootstrap.servers", spec.get("bootstrap").asText());
        props.put("request.timeout.ms", "15000");
        props.put("default.api.timeout.ms", "30000");
        for (Map.Entry<String, JsonNode> e : spec.path("client").properties()) {
            props.put(e.getKey(), e.getValue().asText());
        }
        ObjectNode out = json.createObjectNode();
        try (Admin admin = Admin.create(props)) {
            List<UserScramCredentialAlteration> scram = new ArrayList<>();
            for (JsonNode u : spec.path("upsert_scram")) {
                ScramMechanism mechanism = ScramMechanism.fromMechanismName(u.get("mechanism").asText());
                scram.add(new UserScramCredentialUpsertion(u.get("user").asText(),
                        new ScramCredentialInfo(mechanism, u.path("iterations").asInt(4096)),
                        u.get("password").asText()));
            }
            for (JsonNode u : spec.path("delete_scram")) {
                scram.add(new UserScramCredentialDeletion(u.get("user").asText(),
                        ScramMechanism.fromMechanismName(u.get("mechanism").asText())));
            }
            if (!scram.isEmpty()) {
                admin.alterUserScramCredentials(scram).all().get();
            }
            List<AclBindingFilter> deletes = new ArrayList<>();
            for (JsonNode d : spec.path("delete_acls")) {  // a binding, or all of a principal's
                ResourcePatternFilter pattern = d.has("resource_type")
                        ? new ResourcePatternFilter(ResourceType.valueOf(d.get("resource_type").asText()),
                                d.get("name").asText(), PatternType.valueOf(d.get("pattern").asText()))
                        : ResourcePatternFilter.ANY;
                AclOperation operation = d.has("operation")
                        ? AclOperation.valueOf(d.get("operation").asText()) : AclOperation.ANY;
                deletes.add(new AclBindingFilter(pattern, new AccessControlEntryFilter(
                        d.get("principal").asText(), null, operation, AclPermissionType.ANY)));
            }
            if (!deletes.isEmpty()) {
                admin.deleteAcls(deletes).all().get();
            }
            List<AclBinding> creates = new ArrayList<>();
            for (JsonNode a : spec.path("create_acls")) {
                creates.add(new AclBinding(
                        new ResourcePattern(ResourceType.valueOf(a.get("resource_type").asText()),
                                a.get("name").asText(), PatternType.valueOf(a.get("pattern").asText())),
                        new AccessControlEntry(a.get("principal").asText(), a.path("host").asText("*"),
                                AclOperation.valueOf(a.get("operation").asText()),
                                AclPermissionType.valueOf(a.path("permission").asText("ALLOW")))));
            }
            if (!creates.isEmpty()) {
                admin.createAcls(creates).all().get();
            }
            if (spec.path("describe_acls").asBoolean()) {
                ArrayNode acls = out.putArray("acls");
                for (AclBinding b : admin.describeAcls(AclBindingFilter.ANY).values().get()) {
                    ObjectNode a = acls.addObject();
                    a.put("principal", b.entry().principal());
                    a.put("host", b.entry().host());
                    a.put("resource_type", b.pattern().resourceType().name());
                    a.put("name", b.pattern().name());
                    a.put("pattern", b.pattern().patternType().name());
                    a.put("operation", b.entry().operation().name());
                    a.put("permission", b.entry().permissionType().name());
                }
            }
            if (spec.path("describe_users").asBoolean()) {
                ArrayNode users = out.putArray("users");
                for (String user : admin.describeUserScramCredentials().users().get()) {
                    users.add(user);
                }
            }
        } catch (ExecutionException e) {
            Throwable cause = e.getCause() == null ? e : e.getCause();
            System.err.println(cause.getClass().getSimpleName() + ": " + cause.getMessage());
            System.exit(1);
        }
        System.out.println(json.writeValueAsString(out));
    }
}
